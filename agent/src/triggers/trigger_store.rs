//! Webhook triggers in the database (`event_triggers`) and the delivery log
//! (`webhook_deliveries`). A trigger's secret and header values are write-only: they live in
//! the secrets file (`store/secrets.rs`), never in a table that SQL could read; reads show a
//! placeholder, and an update that sends the placeholder back keeps the stored value.

use std::collections::BTreeMap;

use duckdb::{Connection, OptionalExt, params};
use serde::{Deserialize, Serialize};

use crate::store::patch::{NotNullable, Patch};
use crate::store::schema::{StoreError, db_err};
use crate::store::secrets::{SecretStore, SecretsError, TriggerSecrets};
use crate::triggers::filter::Filter;
use crate::triggers::ssrf::{Guard, SsrfError};

/// What reads show instead of a secret.
pub const SECRET_PLACEHOLDER: &str = "********";

/// Why a trigger change was refused.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The message regex does not compile.
    #[error("trigger {name:?}: {message}")]
    Filter {
        /// The trigger's name.
        name: String,
        /// The compiler's message.
        message: String,
    },
    /// The URL is invalid or its host an address the SSRF guard refuses.
    #[error(transparent)]
    Url(#[from] SsrfError),
    /// No trigger with this id.
    #[error("no trigger with id {0}")]
    UnknownId(u64),
    /// No trigger with this name.
    #[error("no trigger named {0:?}")]
    UnknownName(String),
    /// The name is taken.
    #[error("a trigger named {0:?} exists already")]
    NameTaken(String),
    /// A required field was set to null.
    #[error(transparent)]
    NotNullable(#[from] NotNullable),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The secrets file failed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

/// A trigger as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// Its id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Off triggers match nothing.
    pub enabled: bool,
    /// Conditions.
    pub filter: Filter,
    /// Deliveries per minute (0: no limit).
    pub rate_per_min: u32,
    /// Webhook URL.
    pub url: String,
    /// Signing secret (the placeholder in reads).
    pub secret: Option<String>,
    /// Extra headers (values are placeholders in reads).
    pub headers: BTreeMap<String, String>,
    /// Why the agent turned it off, if it did.
    pub disabled_reason: Option<String>,
}

impl Trigger {
    /// The trigger as reads show it: the secret and every header value replaced by the
    /// placeholder.
    pub fn redacted(mut self) -> Self {
        if self.secret.is_some() {
            self.secret = Some(SECRET_PLACEHOLDER.into());
        }
        for v in self.headers.values_mut() {
            *v = SECRET_PLACEHOLDER.into();
        }
        self
    }

    fn secrets(&self) -> TriggerSecrets {
        TriggerSecrets {
            secret: self.secret.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// A trigger to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTrigger {
    /// Unique name.
    pub name: String,
    /// Webhook URL.
    pub url: String,
    /// Signing secret.
    #[serde(default)]
    pub secret: Option<String>,
    /// Conditions.
    #[serde(default)]
    pub filter: Filter,
    /// Deliveries per minute (0, the default: no limit).
    #[serde(default)]
    pub rate_per_min: u32,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// On (default) or off.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// A partial update; absent fields are kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerPatch {
    /// New name.
    #[serde(default)]
    pub name: Patch<String>,
    /// On or off (turning it on clears the reason it was turned off).
    #[serde(default)]
    pub enabled: Patch<bool>,
    /// New conditions (replaces them all).
    #[serde(default)]
    pub filter: Patch<Filter>,
    /// New rate limit.
    #[serde(default)]
    pub rate_per_min: Patch<u32>,
    /// New URL.
    #[serde(default)]
    pub url: Patch<String>,
    /// New secret; the placeholder keeps the old one, null removes it.
    #[serde(default)]
    pub secret: Patch<String>,
    /// New extra headers (replaces them all; a placeholder value keeps that header's value).
    #[serde(default)]
    pub headers: Patch<BTreeMap<String, String>>,
}

fn check(t: &Trigger, guard: &Guard) -> Result<(), TriggerError> {
    t.filter
        .clone()
        .compile()
        .map_err(|message| TriggerError::Filter {
            name: t.name.clone(),
            message,
        })?;
    guard.check_url(&t.url)?;
    Ok(())
}

const SELECT: &str = "SELECT id, name, enabled, filter::VARCHAR, rate_per_min, url, \
                      disabled_reason FROM event_triggers";

fn from_row(r: &duckdb::Row<'_>) -> duckdb::Result<(Trigger, String)> {
    Ok((
        Trigger {
            id: r.get(0)?,
            name: r.get(1)?,
            enabled: r.get(2)?,
            filter: Filter::default(),
            rate_per_min: r.get(4)?,
            url: r.get(5)?,
            secret: None,
            headers: BTreeMap::new(),
            disabled_reason: r.get(6)?,
        },
        r.get(3)?,
    ))
}

fn finish(
    (mut t, filter): (Trigger, String),
    secrets: &mut BTreeMap<u64, TriggerSecrets>,
) -> Result<Trigger, TriggerError> {
    t.filter = serde_json::from_str(&filter).map_err(|e| {
        TriggerError::Store(StoreError::Native {
            context: format!("reading trigger {}", t.id),
            detail: e.to_string(),
        })
    })?;
    let s = secrets.remove(&t.id).unwrap_or_default();
    t.secret = s.secret;
    t.headers = s.headers;
    Ok(t)
}

/// Every trigger, secrets included (for the dispatcher; redact before showing).
pub fn list(conn: &Connection, secrets: &SecretStore) -> Result<Vec<Trigger>, TriggerError> {
    let mut st = conn
        .prepare(&format!("{SELECT} ORDER BY id"))
        .map_err(db_err("listing triggers"))?;
    let rows = st
        .query_map([], from_row)
        .map_err(db_err("listing triggers"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err("listing triggers"))?;
    let mut all = secrets.load()?;
    rows.into_iter().map(|r| finish(r, &mut all)).collect()
}

/// One trigger, secret included.
pub fn get(conn: &Connection, secrets: &SecretStore, id: u64) -> Result<Trigger, TriggerError> {
    let row = conn
        .query_row(&format!("{SELECT} WHERE id = ?"), [id], from_row)
        .optional()
        .map_err(db_err("reading a trigger"))?;
    let Some(row) = row else {
        return Err(TriggerError::UnknownId(id));
    };
    finish(row, &mut secrets.load()?)
}

/// Finds a trigger by id or name.
pub fn resolve(
    conn: &Connection,
    secrets: &SecretStore,
    id_or_name: &str,
) -> Result<Trigger, TriggerError> {
    pick(&list(conn, secrets)?, id_or_name)
}

/// Finds a trigger of `all` by id or name.
pub fn pick(all: &[Trigger], id_or_name: &str) -> Result<Trigger, TriggerError> {
    all.iter()
        .find(|t| id_or_name.parse::<u64>().is_ok_and(|id| id == t.id))
        .or_else(|| all.iter().find(|t| t.name == id_or_name))
        .cloned()
        .ok_or_else(|| TriggerError::UnknownName(id_or_name.to_string()))
}

fn name_free(conn: &Connection, name: &str, except: u64) -> Result<(), TriggerError> {
    let taken: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM event_triggers WHERE name = ? AND id <> ?",
            params![name, except],
            |r| r.get(0),
        )
        .map_err(db_err("checking trigger names"))?;
    if taken {
        return Err(TriggerError::NameTaken(name.to_string()));
    }
    Ok(())
}

/// Stores a new trigger after checking its filter and URL.
pub fn insert(
    conn: &Connection,
    secrets: &SecretStore,
    n: &NewTrigger,
    guard: &Guard,
) -> Result<Trigger, TriggerError> {
    let t = Trigger {
        id: 0,
        name: n.name.clone(),
        enabled: n.enabled,
        filter: n.filter.clone(),
        rate_per_min: n.rate_per_min,
        url: n.url.clone(),
        secret: n.secret.clone(),
        headers: n.headers.clone(),
        disabled_reason: None,
    };
    check(&t, guard)?;
    name_free(conn, &t.name, 0)?;
    let id: u64 = conn
        .query_row(
            "INSERT INTO event_triggers (name, enabled, filter, rate_per_min, url, updated)
             VALUES (?, ?, ?::JSON, ?, ?, now()::TIMESTAMP) RETURNING id",
            params![
                t.name,
                t.enabled,
                serde_json::to_string(&t.filter).expect("filters serialise"),
                t.rate_per_min,
                t.url,
            ],
            |r| r.get(0),
        )
        .map_err(db_err("inserting a trigger"))?;
    if let Err(e) = secrets.put(id, t.secrets()) {
        // No trigger without the secret it was given: it would send unsigned.
        let _ = conn.execute("DELETE FROM event_triggers WHERE id = ?", [id]);
        return Err(e.into());
    }
    get(conn, secrets, id)
}

fn save(conn: &Connection, t: &Trigger) -> Result<(), TriggerError> {
    conn.execute(
        "UPDATE event_triggers SET name = ?, enabled = ?, filter = ?::JSON, rate_per_min = ?,
                url = ?, disabled_reason = ?, updated = now()::TIMESTAMP WHERE id = ?",
        params![
            t.name,
            t.enabled,
            serde_json::to_string(&t.filter).expect("filters serialise"),
            t.rate_per_min,
            t.url,
            t.disabled_reason,
            t.id
        ],
    )
    .map_err(db_err("updating a trigger"))?;
    Ok(())
}

/// Applies a partial update (checked like a new trigger).
pub fn update(
    conn: &Connection,
    secrets: &SecretStore,
    id: u64,
    p: TriggerPatch,
    guard: &Guard,
) -> Result<Trigger, TriggerError> {
    let mut t = get(conn, secrets, id)?;
    let old_headers = t.headers.clone();
    p.name.apply("name", &mut t.name)?;
    if matches!(p.enabled, Patch::Set(true)) {
        t.disabled_reason = None;
    }
    p.enabled.apply("enabled", &mut t.enabled)?;
    p.filter.apply("filter", &mut t.filter)?;
    p.rate_per_min.apply("rate_per_min", &mut t.rate_per_min)?;
    p.url.apply("url", &mut t.url)?;
    match p.secret {
        Patch::Set(s) if s == SECRET_PLACEHOLDER => {}
        other => other.apply_opt(&mut t.secret),
    }
    p.headers.apply("headers", &mut t.headers)?;
    for (name, value) in t.headers.iter_mut() {
        if value == SECRET_PLACEHOLDER
            && let Some(old) = old_headers.get(name)
        {
            value.clone_from(old);
        }
    }
    check(&t, guard)?;
    name_free(conn, &t.name, t.id)?;
    save(conn, &t)?;
    secrets.put(t.id, t.secrets())?;
    Ok(t)
}

/// Turns a trigger off, saying why (a 410 from its receiver).
pub fn disable(conn: &Connection, id: u64, reason: &str) -> Result<(), TriggerError> {
    let n = conn
        .execute(
            "UPDATE event_triggers SET enabled = false, disabled_reason = ?,
                    updated = now()::TIMESTAMP WHERE id = ?",
            params![reason, id],
        )
        .map_err(db_err("disabling a trigger"))?;
    if n == 0 {
        return Err(TriggerError::UnknownId(id));
    }
    Ok(())
}

/// Deletes a trigger and its secrets; false if there was none.
pub fn delete(conn: &Connection, secrets: &SecretStore, id: u64) -> Result<bool, TriggerError> {
    let n = conn
        .execute("DELETE FROM event_triggers WHERE id = ?", [id])
        .map_err(db_err("deleting a trigger"))?;
    secrets.remove(id)?;
    Ok(n > 0)
}

/// One row of the delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The trigger.
    pub trigger_id: u64,
    /// The event delivered (None for a test delivery).
    pub event_id: Option<u64>,
    /// The webhook-id sent.
    pub webhook_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// delivered, failed, gone, refused, dropped, rate_limited.
    pub outcome: &'static str,
    /// Last HTTP status.
    pub status: Option<u16>,
    /// Last error.
    pub error: Option<String>,
}

/// Appends to the delivery log.
pub fn log_delivery(conn: &Connection, d: &DeliveryRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO webhook_deliveries (ts, trigger_id, event_id, webhook_id, attempts, outcome, status, error)
         VALUES (now()::TIMESTAMP, ?, ?, ?, ?, ?, ?, ?)",
        params![
            d.trigger_id,
            d.event_id,
            d.webhook_id,
            d.attempts,
            d.outcome,
            d.status,
            d.error
        ],
    )
    .map(|_| ())
    .map_err(db_err("logging a webhook delivery"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn crud_keeps_the_secret_and_header_values_behind_the_placeholder() {
        let dir = std::env::temp_dir().join(format!("nattrail-trig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        let c = db.connect().unwrap();
        let s = db.secrets();
        let g = Guard::default();
        let n = NewTrigger {
            name: "ssh-out".into(),
            url: "https://hooks.example.org/x".into(),
            secret: Some("whsec_abc".into()),
            filter: Filter {
                dst_ports: vec![22],
                ..Default::default()
            },
            rate_per_min: 10,
            headers: [("x-api-key".to_string(), "k-123".to_string())].into(),
            enabled: true,
        };
        let t = insert(&c, &s, &n, &g).unwrap();
        let shown = t.clone().redacted();
        assert_eq!(shown.secret.as_deref(), Some(SECRET_PLACEHOLDER));
        assert_eq!(shown.headers["x-api-key"], SECRET_PLACEHOLDER);
        // The placeholder sent back keeps the secret and the header value; only the rate
        // changes.
        let p: TriggerPatch = serde_json::from_str(
            r#"{"secret": "********", "rate_per_min": 5, "headers": {"x-api-key": "********"}}"#,
        )
        .unwrap();
        let u = update(&c, &s, t.id, p, &g).unwrap();
        assert_eq!(u.secret.as_deref(), Some("whsec_abc"));
        assert_eq!(u.headers["x-api-key"], "k-123");
        assert_eq!(u.rate_per_min, 5);
        assert_eq!(u.filter, t.filter);
        assert_eq!(get(&c, &s, t.id).unwrap(), u);
        let p: TriggerPatch = serde_json::from_str(r#"{"secret": null}"#).unwrap();
        assert_eq!(update(&c, &s, t.id, p, &g).unwrap().secret, None);
        // Refused: a bad regex, a loopback URL, a taken name.
        let mut bad = n.clone();
        bad.name = "other".into();
        bad.filter.message = Some("(".into());
        assert!(matches!(
            insert(&c, &s, &bad, &g),
            Err(TriggerError::Filter { .. })
        ));
        bad.filter.message = None;
        bad.url = "http://127.1/".into();
        assert!(matches!(
            insert(&c, &s, &bad, &g),
            Err(TriggerError::Url(_))
        ));
        assert!(matches!(
            insert(&c, &s, &n, &g),
            Err(TriggerError::NameTaken(_))
        ));
        disable(&c, t.id, "receiver answered 410 Gone").unwrap();
        let d = get(&c, &s, t.id).unwrap();
        assert!(!d.enabled && d.disabled_reason.is_some());
        assert_eq!(
            d.headers["x-api-key"], "k-123",
            "disabling keeps the secrets"
        );
        assert!(delete(&c, &s, t.id).unwrap());
        assert!(list(&c, &s).unwrap().is_empty());
        assert!(s.load().unwrap().is_empty(), "deleting removes the secrets");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_schema_5_database_moves_its_secrets_out_and_drops_the_columns() {
        let dir = std::env::temp_dir().join(format!("nattrail-trig5-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        {
            // A schema-5 database as the previous release wrote it.
            let c = crate::store::schema::database_at_version(&path, 5);
            c.execute_batch(
                "INSERT INTO event_triggers (name, enabled, filter, rate_per_min, url, secret, headers, updated)
                 VALUES ('old', true, '{}', 0, 'https://hooks.example.org/o', 'whsec_old', '{\"x-k\": \"hv\"}', now()::TIMESTAMP)",
            )
            .unwrap();
        }
        let db = Database::open_rw(&path).unwrap();
        let c = db.connect().unwrap();
        let t = resolve(&c, &db.secrets(), "old").unwrap();
        assert_eq!(t.secret.as_deref(), Some("whsec_old"));
        assert_eq!(t.headers["x-k"], "hv");
        let cols: Vec<String> = c
            .prepare("SELECT column_name FROM duckdb_columns() WHERE table_name = 'event_triggers' ORDER BY column_index")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !cols.iter().any(|c| c == "secret" || c == "headers"),
            "{cols:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
