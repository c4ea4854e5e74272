//! Trigger secrets (signing keys and header values) live outside the database, in a 0600
//! file in the agent's private directory. Every connection of a DuckDB instance sees every
//! table, and `/sql` runs user text on one of them: a secret in a table is a secret one
//! query away. Here no SQL can reach it (external access is off), and only the trigger
//! store reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use duckdb::Connection;

use super::files::{self, PrivateFileError};
use super::schema::{StoreError, db_err};

/// What one trigger keeps out of the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSecrets {
    /// Signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Extra headers, names and values (values may be credentials).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Errors of the secrets file.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file or its directory is unsafe or unreadable.
    #[error(transparent)]
    File(#[from] PrivateFileError),
    /// The file does not parse.
    #[error("secrets file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Writing the file failed.
    #[error("writing secrets file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why secrets could not be moved out of a schema-5 database.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Reading the old columns failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the secrets file failed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

/// The secrets file of one database.
#[derive(Debug, Clone)]
pub struct SecretStore {
    path: PathBuf,
}

// Read-modify-write of the file by the API's handlers and the dispatcher is serialised
// here; other processes cannot write it while the agent holds the database.
static WRITE: Mutex<()> = Mutex::new(());

impl SecretStore {
    /// The secrets of the database at `db`, in its private directory.
    pub fn for_db(db: &Path) -> Self {
        SecretStore {
            path: files::private_dir(db).join("secrets.json"),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every trigger's secrets, by trigger id.
    pub fn load(&self) -> Result<BTreeMap<u64, TriggerSecrets>, SecretsError> {
        match files::read_private(&self.path)? {
            None => Ok(BTreeMap::new()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| SecretsError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// One trigger's secrets (empty when it has none).
    pub fn get(&self, id: u64) -> Result<TriggerSecrets, SecretsError> {
        Ok(self.load()?.remove(&id).unwrap_or_default())
    }

    /// Sets (or, when empty, removes) one trigger's secrets.
    pub fn put(&self, id: u64, s: TriggerSecrets) -> Result<(), SecretsError> {
        self.change(|all| {
            if s == TriggerSecrets::default() {
                all.remove(&id);
            } else {
                all.insert(id, s);
            }
        })
    }

    /// Removes one trigger's secrets.
    pub fn remove(&self, id: u64) -> Result<(), SecretsError> {
        self.change(|all| {
            all.remove(&id);
        })
    }

    fn change(
        &self,
        f: impl FnOnce(&mut BTreeMap<u64, TriggerSecrets>),
    ) -> Result<(), SecretsError> {
        let _held = WRITE.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.load()?;
        let before = all.clone();
        f(&mut all);
        if all == before {
            return Ok(());
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            files::ensure_private_dir(dir)?;
        }
        let body = serde_json::to_vec(&all).expect("secrets serialise");
        files::write_private_atomic(&self.path, &body, true).map_err(|source| SecretsError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Moves secrets and header values of a schema-5 database into the secrets file, before
/// migration 6 drops their columns.
pub(crate) fn move_secrets_out(conn: &Connection, secrets: &SecretStore) -> Result<(), MoveError> {
    let mut st = conn
        .prepare("SELECT id, secret, headers::VARCHAR FROM event_triggers")
        .map_err(db_err("reading trigger secrets to move"))?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(db_err("reading trigger secrets to move"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err("reading trigger secrets to move"))?;
    for (id, secret, headers) in rows {
        let headers = serde_json::from_str(&headers).map_err(|e| {
            MoveError::Store(StoreError::Native {
                context: format!("reading the headers of trigger {id}"),
                detail: e.to_string(),
            })
        })?;
        secrets.put(id, TriggerSecrets { secret, headers })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_round_trip_in_a_0600_file() {
        let dir = std::env::temp_dir().join(format!("nattrail-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        files::create_private_dir_all(&dir).unwrap();
        let s = SecretStore::for_db(&dir.join("t.duckdb"));
        assert_eq!(s.path(), dir.join("secrets.json"));
        assert_eq!(s.get(1).unwrap(), TriggerSecrets::default());
        let one = TriggerSecrets {
            secret: Some("whsec_x".into()),
            headers: [("x-key".to_string(), "v".to_string())].into(),
        };
        s.put(1, one.clone()).unwrap();
        s.put(2, one.clone()).unwrap();
        assert_eq!(s.get(1).unwrap(), one);
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        s.remove(1).unwrap();
        s.put(2, TriggerSecrets::default()).unwrap();
        assert!(s.load().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
