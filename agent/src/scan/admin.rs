//! Rule administration shared by the API and the CLI (which works on the database directly
//! when no agent runs): requests, answers and the operations behind them.

use std::collections::BTreeMap;
use std::time::Duration;

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::engine::{CompileError, WorkloadRules, compile, compile_errors};
use super::rules::{Override, Rule, Scope, Severity, StreamSel, effective};
use crate::pipeline::messages::Stream;
use crate::scan::rule_store::{self as rules, NewRule, RuleError};

/// A rule to create, as the API and the CLI take it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRequest {
    /// Short name.
    pub name: String,
    /// The regex.
    pub pattern: String,
    /// stdout, stderr or both (default both).
    #[serde(default)]
    pub stream: StreamSel,
    /// info, warning (default), error or critical.
    #[serde(default)]
    pub severity: Severity,
    /// Per-container cooldown in seconds (default 0).
    #[serde(default)]
    pub cooldown_s: u64,
    /// On (default) or off.
    #[serde(default = "on")]
    pub enabled: bool,
    /// The workload it is for; absent for a global rule.
    #[serde(default)]
    pub workload: Option<String>,
}

fn on() -> bool {
    true
}

impl RuleRequest {
    fn to_new(&self) -> NewRule {
        NewRule {
            name: self.name.clone(),
            pattern: self.pattern.clone(),
            stream: self.stream,
            severity: self.severity,
            cooldown: Duration::from_secs(self.cooldown_s),
            enabled: self.enabled,
            scope: self
                .workload
                .clone()
                .map(Scope::Workload)
                .unwrap_or(Scope::Global),
        }
    }
}

/// Every rule and override.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuleList {
    /// Rules by id.
    pub rules: Vec<Rule>,
    /// Overrides of global rules.
    pub overrides: Vec<Override>,
    /// Stored rules whose pattern this build cannot compile (written by hand or by another
    /// version), with the compiler's message: they scan nothing until fixed.
    #[serde(default)]
    pub compile_errors: Vec<CompileError>,
}

/// A workload's change to a global rule, as the API takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideRequest {
    /// Turn the rule off (or on) for the workload.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Another severity for the workload.
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A sample line to try.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialRequest {
    /// The line.
    pub line: String,
    /// Try the effective rules of this workload (default: the global rules).
    #[serde(default)]
    pub workload: Option<String>,
    /// Try this pattern alone instead of stored rules.
    #[serde(default)]
    pub pattern: Option<String>,
    /// The stream the line came on (default: either).
    #[serde(default)]
    pub stream: Option<StreamSel>,
}

/// One rule matching a sample line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrialMatch {
    /// The rule (0 for a pattern tried alone).
    pub rule_id: u64,
    /// Its name.
    pub rule_name: String,
    /// Severity its hit would have.
    pub severity: Severity,
    /// Named groups by name, unnamed as $N.
    pub captures: BTreeMap<String, String>,
}

/// The answer to a trial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrialAnswer {
    /// Any rule matched.
    pub matched: bool,
    /// The rules that matched, by id.
    pub matches: Vec<TrialMatch>,
}

/// Creates a rule (its pattern compiled first).
pub fn add(conn: &Connection, req: &RuleRequest) -> Result<Rule, RuleError> {
    rules::insert(conn, &req.to_new())
}

/// Every rule and override.
pub fn list(conn: &Connection) -> Result<RuleList, RuleError> {
    let (rules, overrides) = rules::list(conn)?;
    Ok(RuleList {
        compile_errors: compile_errors(&rules),
        rules,
        overrides,
    })
}

/// Sets a workload's override of a global rule.
pub fn set_override(
    conn: &Connection,
    rule_id: u64,
    workload: &str,
    req: &OverrideRequest,
) -> Result<(), RuleError> {
    rules::set_override(
        conn,
        &Override {
            rule_id,
            workload: workload.to_string(),
            enabled: req.enabled,
            severity: req.severity,
        },
    )
}

/// The rules that apply to `workload`, overrides applied.
pub fn effective_rules(conn: &Connection, workload: &str) -> Result<Vec<Rule>, RuleError> {
    let (rules, overrides) = rules::list(conn)?;
    Ok(effective(&rules, &overrides, &[workload]))
}

/// Tries a line against a pattern or a workload's rules.
pub fn trial(conn: &Connection, req: &TrialRequest) -> Result<TrialAnswer, RuleError> {
    let rules = match &req.pattern {
        Some(p) => {
            compile(p).map_err(|message| RuleError::Pattern {
                name: "(trial)".into(),
                message,
            })?;
            vec![Rule {
                id: 0,
                name: "(trial)".into(),
                pattern: p.clone(),
                stream: StreamSel::Both,
                severity: Severity::default(),
                cooldown: Duration::ZERO,
                enabled: true,
                scope: Scope::Global,
            }]
        }
        None => {
            let (rules, overrides) = rules::list(conn)?;
            let names: Vec<&str> = req.workload.iter().map(String::as_str).collect();
            effective(&rules, &overrides, &names)
        }
    };
    let set = WorkloadRules::build(rules);
    let streams: &[Stream] = match req.stream {
        Some(StreamSel::Stdout) => &[Stream::Stdout],
        Some(StreamSel::Stderr) => &[Stream::Stderr],
        None | Some(StreamSel::Both) => &[Stream::Stdout, Stream::Stderr],
    };
    let mut matches: Vec<TrialMatch> = Vec::new();
    for s in streams {
        for (rule, captures) in set.matches(&req.line, *s) {
            if !matches.iter().any(|m| m.rule_id == rule.id) {
                matches.push(TrialMatch {
                    rule_id: rule.id,
                    rule_name: rule.name.clone(),
                    severity: rule.severity,
                    captures,
                });
            }
        }
    }
    matches.sort_by_key(|m| m.rule_id);
    Ok(TrialAnswer {
        matched: !matches.is_empty(),
        matches,
    })
}

/// Finds a rule by id or, failing that, by its (unique) name.
pub fn resolve(rules: &[Rule], id_or_name: &str) -> Result<Rule, RuleError> {
    if let Ok(id) = id_or_name.parse::<u64>()
        && let Some(r) = rules.iter().find(|r| r.id == id)
    {
        return Ok(r.clone());
    }
    let named: Vec<&Rule> = rules.iter().filter(|r| r.name == id_or_name).collect();
    match named.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(RuleError::UnknownName(id_or_name.to_string())),
        many => Err(RuleError::AmbiguousName {
            name: id_or_name.to_string(),
            ids: many.iter().map(|r| r.id).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn a_pattern_stored_by_hand_that_does_not_compile_is_reported_on_the_listing() {
        let dir = std::env::temp_dir().join(format!("nattrail-admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        let c = db.connect().unwrap();
        c.execute_batch(
            "INSERT INTO log_scan_rules (name, pattern, stream, severity, cooldown_s, enabled, updated)
             VALUES ('hand', '(oops', 'both', 'error', 0, true, now()::TIMESTAMP)",
        )
        .unwrap();
        let l = list(&c).unwrap();
        assert_eq!(l.compile_errors.len(), 1);
        assert!(l.compile_errors[0].error.contains("unclosed group"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
