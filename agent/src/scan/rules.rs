//! Log-scan rules: global ones, per-workload ones, and per-workload overrides of the globals,
//! combined into the effective rules of one workload.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pipeline::messages::Stream;

/// Which streams a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamSel {
    /// Standard output only.
    Stdout,
    /// Standard error only.
    Stderr,
    /// Both.
    #[default]
    Both,
}

impl StreamSel {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamSel::Stdout => "stdout",
            StreamSel::Stderr => "stderr",
            StreamSel::Both => "both",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(StreamSel::Stdout),
            "stderr" => Ok(StreamSel::Stderr),
            "both" => Ok(StreamSel::Both),
            other => Err(format!(
                "unknown stream {other:?}: use stdout, stderr or both"
            )),
        }
    }

    /// Whether lines of `s` are for this rule.
    pub fn wants(self, s: Stream) -> bool {
        matches!(
            (self, s),
            (StreamSel::Both, _)
                | (StreamSel::Stdout, Stream::Stdout)
                | (StreamSel::Stderr, Stream::Stderr)
        )
    }
}

/// How bad a hit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Something is wrong.
    #[default]
    Warning,
    /// Needs attention.
    Error,
    /// Needs attention now.
    Critical,
}

impl Severity {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity {other:?}: use info, warning, error or critical"
            )),
        }
    }
}

/// Where a rule applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", content = "workload")]
pub enum Scope {
    /// Every workload.
    #[default]
    Global,
    /// One workload: a container name, a compose service or a label value.
    Workload(String),
}

/// A rule as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Its id.
    pub id: u64,
    /// Short name, shown in hits.
    pub name: String,
    /// The regex.
    pub pattern: String,
    /// Which streams it reads.
    pub stream: StreamSel,
    /// Severity of its hits.
    pub severity: Severity,
    /// Per container: no second hit within this long.
    #[serde(with = "humantime_serde_secs", rename = "cooldown_s")]
    pub cooldown: Duration,
    /// Off rules are kept but not applied.
    pub enabled: bool,
    /// Global or one workload.
    pub scope: Scope,
}

/// Durations as whole seconds in JSON.
mod humantime_serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

/// A workload's change to one global rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// The global rule.
    pub rule_id: u64,
    /// The workload it applies to.
    pub workload: String,
    /// Turn the rule off (or on) for this workload.
    pub enabled: Option<bool>,
    /// Another severity for this workload.
    pub severity: Option<Severity>,
}

/// The effective rules of a workload known by the names in `workloads` (a container's name,
/// its compose service, its workload label): the globals with its overrides applied, then
/// its own rules; disabled ones left out. Ordered by rule id so snapshots are reproducible.
pub fn effective<S: AsRef<str>>(
    rules: &[Rule],
    overrides: &[Override],
    workloads: &[S],
) -> Vec<Rule> {
    let named = |w: &str| workloads.iter().any(|n| n.as_ref() == w);
    let mut out: Vec<Rule> = rules
        .iter()
        .filter_map(|r| match &r.scope {
            Scope::Global => {
                let mut r = r.clone();
                for o in overrides
                    .iter()
                    .filter(|o| o.rule_id == r.id && named(&o.workload))
                {
                    if let Some(e) = o.enabled {
                        r.enabled = e;
                    }
                    if let Some(s) = o.severity {
                        r.severity = s;
                    }
                }
                Some(r)
            }
            Scope::Workload(w) if named(w) => Some(r.clone()),
            Scope::Workload(_) => None,
        })
        .filter(|r| r.enabled)
        .collect();
    out.sort_by_key(|r| r.id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: u64, scope: Scope) -> Rule {
        Rule {
            id,
            name: format!("r{id}"),
            pattern: "x".into(),
            stream: StreamSel::Both,
            severity: Severity::Warning,
            cooldown: Duration::ZERO,
            enabled: true,
            scope,
        }
    }

    #[test]
    fn globals_minus_overrides_plus_own_rules() {
        let rules = vec![
            rule(1, Scope::Global),
            rule(2, Scope::Global),
            rule(3, Scope::Workload("web".into())),
            rule(4, Scope::Workload("db".into())),
        ];
        let overrides = vec![
            Override {
                rule_id: 1,
                workload: "web".into(),
                enabled: Some(false),
                severity: None,
            },
            Override {
                rule_id: 2,
                workload: "web".into(),
                enabled: None,
                severity: Some(Severity::Critical),
            },
        ];
        let web = effective(&rules, &overrides, &["web"]);
        assert_eq!(web.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(web[0].severity, Severity::Critical);
        let db = effective(&rules, &overrides, &["db-1", "db"]);
        assert_eq!(db.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(db[1].severity, Severity::Warning);
    }
}
