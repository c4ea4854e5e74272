//! The log-scan rules in the database (`log_scan_rules`, `log_scan_overrides`): create,
//! list, update, delete, with patterns checked by the compiler before they are stored.

use std::time::Duration;

use duckdb::{Connection, OptionalExt, params};

use crate::scan::engine::compile;
use crate::scan::rules::{Override, Rule, Scope, Severity, StreamSel};
use crate::store::patch::{NotNullable, Patch};
use crate::store::schema::{StoreError, db_err};

/// Why a rule change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The pattern does not compile (or is over the size limit): the compiler's message.
    #[error("pattern of rule {name:?} does not compile: {message}")]
    Pattern {
        /// The rule's name.
        name: String,
        /// regex's message.
        message: String,
    },
    /// No rule with this id.
    #[error("no log-scan rule with id {0}")]
    UnknownId(u64),
    /// No rule with this name (nor this id).
    #[error("no log-scan rule with id or name {0:?}")]
    UnknownName(String),
    /// Several rules have this name.
    #[error("several log-scan rules are named {name:?} (ids {ids:?}): give the id")]
    AmbiguousName {
        /// The name.
        name: String,
        /// Their ids.
        ids: Vec<u64>,
    },
    /// Overrides apply to global rules only.
    #[error("rule {0} belongs to one workload; only global rules can be overridden")]
    NotGlobal(u64),
    /// A required field was set to null.
    #[error(transparent)]
    NotNullable(#[from] NotNullable),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rule to create.
#[derive(Debug, Clone)]
pub struct NewRule {
    /// Short name.
    pub name: String,
    /// The regex.
    pub pattern: String,
    /// Streams read.
    pub stream: StreamSel,
    /// Severity of hits.
    pub severity: Severity,
    /// Cooldown per container.
    pub cooldown: Duration,
    /// On or off.
    pub enabled: bool,
    /// Global or one workload.
    pub scope: Scope,
}

/// A partial update; absent fields are kept.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulePatch {
    /// New name.
    #[serde(default)]
    pub name: Patch<String>,
    /// New pattern (compiled before it is stored).
    #[serde(default)]
    pub pattern: Patch<String>,
    /// New streams.
    #[serde(default)]
    pub stream: Patch<StreamSel>,
    /// New severity.
    #[serde(default)]
    pub severity: Patch<Severity>,
    /// New cooldown in seconds.
    #[serde(default)]
    pub cooldown_s: Patch<u64>,
    /// On or off.
    #[serde(default)]
    pub enabled: Patch<bool>,
}

fn check(name: &str, pattern: &str) -> Result<(), RuleError> {
    compile(pattern)
        .map(|_| ())
        .map_err(|message| RuleError::Pattern {
            name: name.to_string(),
            message,
        })
}

fn workload_of(scope: &Scope) -> Option<&str> {
    match scope {
        Scope::Global => None,
        Scope::Workload(w) => Some(w),
    }
}

/// Stores a new rule after checking its pattern.
pub fn insert(conn: &Connection, r: &NewRule) -> Result<Rule, RuleError> {
    check(&r.name, &r.pattern)?;
    let id: u64 = conn
        .query_row(
            "INSERT INTO log_scan_rules (name, pattern, stream, severity, cooldown_s, enabled, workload, updated)
             VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP) RETURNING id",
            params![
                r.name,
                r.pattern,
                r.stream.as_str(),
                r.severity.as_str(),
                r.cooldown.as_secs(),
                r.enabled,
                workload_of(&r.scope)
            ],
            |row| row.get(0),
        )
        .map_err(db_err("inserting a log-scan rule"))?;
    get(conn, id)?.ok_or(RuleError::UnknownId(id))
}

fn from_row(r: &duckdb::Row<'_>) -> duckdb::Result<(Rule, String, String)> {
    let workload: Option<String> = r.get(7)?;
    Ok((
        Rule {
            id: r.get(0)?,
            name: r.get(1)?,
            pattern: r.get(2)?,
            // Parsed by the caller: a row function cannot return our error type.
            stream: StreamSel::Both,
            severity: Severity::Warning,
            cooldown: Duration::from_secs(r.get(5)?),
            enabled: r.get(6)?,
            scope: workload.map(Scope::Workload).unwrap_or(Scope::Global),
        },
        r.get(3)?,
        r.get(4)?,
    ))
}

fn finish((mut rule, stream, severity): (Rule, String, String)) -> Result<Rule, RuleError> {
    let bad = |e: String| {
        RuleError::Store(StoreError::Native {
            context: format!("reading log-scan rule {}", rule.id),
            detail: e,
        })
    };
    rule.stream = StreamSel::parse(&stream).map_err(bad)?;
    rule.severity = Severity::parse(&severity).map_err(bad)?;
    Ok(rule)
}

const SELECT: &str =
    "SELECT id, name, pattern, stream, severity, cooldown_s, enabled, workload FROM log_scan_rules";

/// One rule.
pub fn get(conn: &Connection, id: u64) -> Result<Option<Rule>, RuleError> {
    let row = conn
        .query_row(&format!("{SELECT} WHERE id = ?"), [id], from_row)
        .optional()
        .map_err(db_err("reading a log-scan rule"))?;
    row.map(finish).transpose()
}

/// Every rule and override, rules by id.
pub fn list(conn: &Connection) -> Result<(Vec<Rule>, Vec<Override>), RuleError> {
    let mut stmt = conn
        .prepare(&format!("{SELECT} ORDER BY id"))
        .map_err(db_err("listing log-scan rules"))?;
    let rows = stmt
        .query_map([], from_row)
        .map_err(db_err("listing log-scan rules"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err("listing log-scan rules"))?;
    let rules = rows
        .into_iter()
        .map(finish)
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn
        .prepare("SELECT rule_id, workload, enabled, severity FROM log_scan_overrides ORDER BY rule_id, workload")
        .map_err(db_err("listing overrides"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<bool>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .map_err(db_err("listing overrides"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err("listing overrides"))?;
    let mut overrides = Vec::new();
    for (rule_id, workload, enabled, severity) in rows {
        let severity = severity
            .map(|s| Severity::parse(&s))
            .transpose()
            .map_err(|detail| {
                RuleError::Store(StoreError::Native {
                    context: format!("reading the override of rule {rule_id}"),
                    detail,
                })
            })?;
        overrides.push(Override {
            rule_id,
            workload,
            enabled,
            severity,
        });
    }
    Ok((rules, overrides))
}

/// Applies a partial update; None when the rule does not exist.
pub fn update(conn: &Connection, id: u64, p: RulePatch) -> Result<Rule, RuleError> {
    let mut r = get(conn, id)?.ok_or(RuleError::UnknownId(id))?;
    p.name.apply("name", &mut r.name)?;
    p.pattern.apply("pattern", &mut r.pattern)?;
    p.stream.apply("stream", &mut r.stream)?;
    p.severity.apply("severity", &mut r.severity)?;
    let mut cooldown = r.cooldown.as_secs();
    p.cooldown_s.apply("cooldown_s", &mut cooldown)?;
    r.cooldown = Duration::from_secs(cooldown);
    p.enabled.apply("enabled", &mut r.enabled)?;
    check(&r.name, &r.pattern)?;
    conn.execute(
        "UPDATE log_scan_rules SET name = ?, pattern = ?, stream = ?, severity = ?, cooldown_s = ?,
                enabled = ?, compile_error = NULL, updated = now()::TIMESTAMP WHERE id = ?",
        params![
            r.name,
            r.pattern,
            r.stream.as_str(),
            r.severity.as_str(),
            cooldown,
            r.enabled,
            id
        ],
    )
    .map_err(db_err("updating a log-scan rule"))?;
    Ok(r)
}

/// Deletes a rule and, in the same transaction, its overrides. False if it did not exist.
pub fn delete(conn: &Connection, id: u64) -> Result<bool, RuleError> {
    let run = || -> Result<usize, duckdb::Error> {
        conn.execute_batch("BEGIN TRANSACTION")?;
        conn.execute("DELETE FROM log_scan_overrides WHERE rule_id = ?", [id])?;
        let n = conn.execute("DELETE FROM log_scan_rules WHERE id = ?", [id])?;
        conn.execute_batch("COMMIT")?;
        Ok(n)
    };
    match run() {
        Ok(n) => Ok(n > 0),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(db_err("deleting a log-scan rule")(e).into())
        }
    }
}

/// Sets (or replaces) a workload's override of a global rule.
pub fn set_override(conn: &Connection, o: &Override) -> Result<(), RuleError> {
    let rule = get(conn, o.rule_id)?.ok_or(RuleError::UnknownId(o.rule_id))?;
    if rule.scope != Scope::Global {
        return Err(RuleError::NotGlobal(o.rule_id));
    }
    conn.execute(
        "INSERT OR REPLACE INTO log_scan_overrides VALUES (?, ?, ?, ?)",
        params![
            o.rule_id,
            o.workload,
            o.enabled,
            o.severity.map(Severity::as_str)
        ],
    )
    .map_err(db_err("storing an override"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::rules::effective;
    use crate::store::database::Database;

    fn new_rule(name: &str, pattern: &str, scope: Scope) -> NewRule {
        NewRule {
            name: name.into(),
            pattern: pattern.into(),
            stream: StreamSel::Both,
            severity: Severity::Warning,
            cooldown: Duration::from_secs(30),
            enabled: true,
            scope,
        }
    }

    #[test]
    fn crud_with_overrides_and_checked_patterns() {
        let dir = std::env::temp_dir().join(format!("nattrail-rules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        let c = db.connect().unwrap();

        let g = insert(&c, &new_rule("oom", "OutOfMemory", Scope::Global)).unwrap();
        let w = insert(
            &c,
            &new_rule("slow", r"latency=\d{4,}ms", Scope::Workload("web".into())),
        )
        .unwrap();
        let err = insert(&c, &new_rule("broken", "(unclosed", Scope::Global)).unwrap_err();
        assert!(err.to_string().contains("unclosed group"), "{err}");

        set_override(
            &c,
            &Override {
                rule_id: g.id,
                workload: "web".into(),
                enabled: None,
                severity: Some(Severity::Critical),
            },
        )
        .unwrap();
        assert!(matches!(
            set_override(
                &c,
                &Override {
                    rule_id: w.id,
                    workload: "db".into(),
                    enabled: Some(false),
                    severity: None
                }
            ),
            Err(RuleError::NotGlobal(_))
        ));
        let (rules, overrides) = list(&c).unwrap();
        assert_eq!(rules.len(), 2);
        let web = effective(&rules, &overrides, &["web"]);
        assert_eq!(web.len(), 2);
        assert_eq!(web[0].severity, Severity::Critical);

        let patch: RulePatch =
            serde_json::from_str(r#"{"cooldown_s": 5, "severity": "error"}"#).unwrap();
        let u = update(&c, g.id, patch).unwrap();
        assert_eq!(
            (u.cooldown, u.severity, u.name.as_str()),
            (Duration::from_secs(5), Severity::Error, "oom")
        );
        let bad: RulePatch = serde_json::from_str(r#"{"pattern": "a{99999999}"}"#).unwrap();
        assert!(matches!(
            update(&c, g.id, bad),
            Err(RuleError::Pattern { .. })
        ));
        let null: RulePatch = serde_json::from_str(r#"{"name": null}"#).unwrap();
        assert!(matches!(
            update(&c, g.id, null),
            Err(RuleError::NotNullable(_))
        ));
        assert!(matches!(
            update(&c, 999, RulePatch::default()),
            Err(RuleError::UnknownId(999))
        ));

        // Deleting the global rule takes its overrides with it.
        assert!(delete(&c, g.id).unwrap());
        assert!(!delete(&c, g.id).unwrap());
        let (rules, overrides) = list(&c).unwrap();
        assert_eq!(rules.len(), 1);
        assert!(overrides.is_empty());
        drop(c);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
