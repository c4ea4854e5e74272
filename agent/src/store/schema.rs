//! Opening the DuckDB file and bringing its schema up to date with forward migrations.

use std::path::{Path, PathBuf};

use duckdb::Connection;

/// The migrations, in order. Each runs once, in its own transaction; never edit a released one.
const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "conntrack trail",
        include_str!("../../../schemas/duckdb/0001_conntrack.sql"),
    ),
    (
        2,
        "capture gaps",
        include_str!("../../../schemas/duckdb/0002_capture_gaps.sql"),
    ),
    (
        3,
        "log scan rules and event log",
        include_str!("../../../schemas/duckdb/0003_log_scan.sql"),
    ),
    (
        4,
        "log cursors",
        include_str!("../../../schemas/duckdb/0004_log_cursors.sql"),
    ),
    (
        5,
        "webhook triggers",
        include_str!("../../../schemas/duckdb/0005_triggers.sql"),
    ),
    (
        6,
        "trigger secrets out of the database",
        include_str!("../../../schemas/duckdb/0006_trigger_secrets.sql"),
    ),
    (
        7,
        "open flows checkpointed",
        include_str!("../../../schemas/duckdb/0007_open_flows.sql"),
    ),
    (
        8,
        "one row per flow, hourly partitions",
        include_str!("../../../schemas/duckdb/0008_flow_trail.sql"),
    ),
    (
        9,
        "process executions",
        include_str!("../../../schemas/duckdb/0009_process_events.sql"),
    ),
    (
        10,
        "socket owners and containers",
        include_str!("../../../schemas/duckdb/0010_socket_owners.sql"),
    ),
    (
        11,
        "late slices of sealed hours",
        include_str!("../../../schemas/duckdb/0011_late_slices.sql"),
    ),
    (
        12,
        "covered hours in the open-flow checkpoint",
        include_str!("../../../schemas/duckdb/0012_checkpoint_covered.sql"),
    ),
    (
        13,
        "sealed hours in daily tables",
        include_str!("../../../schemas/duckdb/0013_daily_tables.sql"),
    ),
    (
        14,
        "the ends of long flows by their start day",
        include_str!("../../../schemas/duckdb/0014_flow_ends.sql"),
    ),
];

/// A migration's part written in Rust, inside its transaction.
type RustStep = fn(&Connection) -> Result<(), StoreError>;

/// Where a migration hands over to Rust (with progress logs): migration 8 to move the event
/// rows into slices, migration 13 to keep the sealed hours beside the new daily tables,
/// migration 14 to give each day its ends table.
const RUST_STEPS: &[(u32, &str, RustStep)] = &[
    (
        8,
        "-- MOVE THE EVENTS HERE",
        crate::store::trail::move_events,
    ),
    (
        13,
        "-- KEEP THE SEALED HOURS HERE",
        crate::store::days::keep_legacy,
    ),
    (
        14,
        "-- ADD THE ENDS TABLES HERE",
        crate::store::days::add_ends,
    ),
];

/// The migrations up to `version`, for tests that build an old database.
#[cfg(test)]
pub(crate) fn migrations_up_to(version: u32) -> impl Iterator<Item = (u32, &'static str)> {
    MIGRATIONS
        .iter()
        .filter(move |m| m.0 <= version)
        .map(|m| (m.0, m.2))
}

/// A database as the release with schema `version` left it (for migration tests): its
/// migrations applied, nothing else.
#[cfg(test)]
pub(crate) fn database_at_version(path: &Path, version: u32) -> Connection {
    let c = Connection::open(path).expect("opening the old database");
    c.execute_batch(
        "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL, description VARCHAR NOT NULL)",
    )
    .expect("schema_version");
    for (v, sql) in migrations_up_to(version) {
        c.execute_batch(sql).expect("an old migration");
        c.execute(
            "INSERT INTO schema_version VALUES (?, now()::TIMESTAMP, 'old')",
            [v],
        )
        .expect("recording an old migration");
    }
    c
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Errors of opening or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (normally the running agent) holds the file.
    #[error(
        "database {path} is locked by another process (is `nattrail run` holding it?): {detail}"
    )]
    Locked {
        /// Database file.
        path: PathBuf,
        /// DuckDB's message.
        detail: String,
    },
    /// The file does not exist (read-only open).
    #[error("database {0} does not exist (has the agent run with this --db?)")]
    Missing(PathBuf),
    /// The directory could not be created.
    #[error("creating directory {path}: {source}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file opened read-only holds no nattrail schema version.
    #[error("database {path} is not a nattrail trail (no schema version could be read): {detail}")]
    NotATrail {
        /// Database file.
        path: PathBuf,
        /// DuckDB's error.
        detail: String,
    },
    /// The file was written by a newer nattrail.
    #[error("database {path} has schema version {found}, newer than this build's {SCHEMA_VERSION}")]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// An error reported through DuckDB's C API (raw database and appender handles).
    #[error("{context}: {detail}")]
    Native {
        /// What failed.
        context: String,
        /// DuckDB's message.
        detail: String,
    },
    /// Any other DuckDB error, with what we were doing.
    #[error("{context}: {source}")]
    Db {
        /// What failed.
        context: String,
        /// DuckDB's error.
        source: duckdb::Error,
    },
}

/// Wraps a DuckDB error with context.
pub fn db_err(context: impl Into<String>) -> impl FnOnce(duckdb::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Db { context, source }
}

impl StoreError {
    /// Classifies DuckDB's message on a failed open: a lock held by another process or any
    /// other failure.
    pub(crate) fn from_open_message(path: &Path, detail: String) -> Self {
        if detail.contains("lock") {
            StoreError::Locked {
                path: path.to_path_buf(),
                detail,
            }
        } else {
            StoreError::Native {
                context: format!("opening database {}", path.display()),
                detail,
            }
        }
    }
}

/// Opens an existing database read-only (the CLI when no agent runs), locked down like
/// every database the agent opens.
pub fn open_ro(path: &Path) -> Result<Connection, StoreError> {
    crate::store::database::Database::open_ro(path)?.connect()
}

/// Refuses a database written by a newer nattrail, or one that is no nattrail trail; returns
/// its version.
pub(crate) fn check_version(conn: &Connection, path: &Path) -> Result<u32, StoreError> {
    // The table itself, not the catalog: listing tables (information_schema, duckdb_tables())
    // makes DuckDB build and parse every built-in view first, 13 ms of a CLI lookup's 70.
    let v = max_version(conn).map_err(|e| StoreError::NotATrail {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if v > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: v,
        });
    }
    Ok(v)
}

/// The highest version in `schema_version`, 0 when it is empty. The maximum is taken here,
/// not with `max()`: binding an aggregate (or any unnamed computed column) makes DuckDB 2.0
/// build its keyword table by parsing its grammar a second time, which cost a CLI lookup
/// 51.4 against 43.7 ms side by side; the table holds a row per migration.
fn max_version(conn: &Connection) -> duckdb::Result<u32> {
    let mut st = conn.prepare("SELECT version FROM main.schema_version")?;
    st.query_map([], |r| r.get::<_, u32>(0))?
        .try_fold(0, |max, v| v.map(|v| max.max(v)))
}

fn current_version(conn: &Connection) -> Result<u32, StoreError> {
    let exists: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM information_schema.tables WHERE table_name = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .map_err(db_err("reading schema version"))?;
    if !exists {
        return Ok(0);
    }
    max_version(conn).map_err(db_err("reading schema version"))
}

pub(crate) fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL, description VARCHAR NOT NULL)",
    )
    .map_err(db_err("creating schema_version"))?;
    let have = current_version(conn)?;
    if have > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: have,
        });
    }
    for &(version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
        if version == 6 {
            // Idempotent: a failed migration leaves the columns, and a retry moves them again.
            let secrets = crate::store::secrets::SecretStore::for_db(path);
            crate::store::secrets::move_secrets_out(conn, &secrets).map_err(|e| {
                StoreError::Native {
                    context: format!("applying migration {version} ({description})"),
                    detail: e.to_string(),
                }
            })?;
        }
        let step = RUST_STEPS.iter().find(|s| s.0 == version);
        let (before, after) = step.and_then(|s| sql.split_once(s.1)).unwrap_or((sql, ""));
        let context = format!("applying migration {version} ({description})");
        let applied = (|| {
            conn.execute_batch(&format!("BEGIN TRANSACTION;\n{before}"))
                .map_err(db_err(context.clone()))?;
            if let Some(step) = step {
                (step.2)(conn)?;
            }
            conn.execute_batch(&format!(
                "{after}\nINSERT INTO schema_version VALUES ({version}, now()::TIMESTAMP, '{description}');\nCOMMIT;"
            ))
            .map_err(db_err(context.clone()))
        })();
        if let Err(e) = applied {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        tracing::info!(version, description, "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn migrates_once_and_reopens() {
        let dir = std::env::temp_dir().join(format!("nattrail-schema-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/t.duckdb");
        {
            let db = Database::open_rw(&path).unwrap();
            let c = db.connect().unwrap();
            assert_eq!(current_version(&c).unwrap(), SCHEMA_VERSION);
            let ip: String = c
                .query_row("SELECT nt_ip(281470854561797::UHUGEINT)", [], |r| r.get(0))
                .unwrap();
            assert_eq!(ip, "10.77.0.5");
        }
        {
            let db = Database::open_rw(&path).unwrap();
            let c = db.connect().unwrap();
            let n: i64 = c
                .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, i64::from(SCHEMA_VERSION));
        }
        let ro = open_ro(&path).unwrap();
        assert!(ro.execute_batch("CREATE TABLE x (a INT)").is_err());
        // Bounded, whatever the machine: a read-only open is the CLI on a gateway.
        let limit: String = ro
            .query_row("SELECT current_setting('memory_limit')", [], |r| r.get(0))
            .unwrap();
        assert_eq!(limit, "256.0 MiB");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An operator who keeps the trail on another disk links it into place: DuckDB resolves
    /// the link and then refused, under the lockdown, to touch the WAL beside the target.
    #[test]
    fn a_trail_reached_through_a_symlink_opens_both_ways() {
        let dir = std::env::temp_dir().join(format!("nattrail-symlink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("disk")).unwrap();
        let (target, link) = (dir.join("disk/t.duckdb"), dir.join("t.duckdb"));
        drop(Database::open_rw(&target).unwrap());
        std::os::unix::fs::symlink(&target, &link).unwrap();
        {
            let db = Database::open_rw(&link).unwrap();
            db.connect()
                .unwrap()
                .execute_batch("CREATE TABLE marker AS SELECT 42 AS v")
                .unwrap();
        }
        let v: i32 = open_ro(&link)
            .unwrap()
            .query_row("SELECT v FROM marker", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 42);
        // A link to a trail not yet created: the agent's first start.
        let fresh = dir.join("fresh.duckdb");
        std::os::unix::fs::symlink(dir.join("disk/fresh.duckdb"), &fresh).unwrap();
        drop(Database::open_rw(&fresh).unwrap());
        assert!(dir.join("disk/fresh.duckdb").is_file());
        assert_eq!(
            open_ro(&fresh)
                .unwrap()
                .query_row("SELECT 1", [], |r| r.get::<_, i32>(0))
                .unwrap(),
            1
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
