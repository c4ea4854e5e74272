//! Capture sessions (`capture_sessions`): one row per agent run, so a reader can tell the
//! time the trail was recorded from the time nothing was listening.

use duckdb::types::{TimeUnit, Value};
use duckdb::{Connection, params};
use tracing::warn;

use super::schema::{StoreError, db_err};

/// A DuckDB timestamp of `ns` since the epoch.
pub fn ts_value(ns: u64) -> Value {
    Value::Timestamp(TimeUnit::Microsecond, (ns / 1_000) as i64)
}

/// Starts a session at `now_ns`; returns its id.
pub fn start(conn: &Connection, now_ns: u64) -> Result<u64, StoreError> {
    let id: u64 = conn
        .query_row(
            "SELECT coalesce(max(id) + 1, 1)::UBIGINT FROM capture_sessions",
            [],
            |r| r.get(0),
        )
        .map_err(db_err("reading capture sessions"))?;
    let now = ts_value(now_ns);
    conn.execute(
        "INSERT INTO capture_sessions VALUES (?, ?, NULL, ?, ?, ?)",
        params![id, now.clone(), now, hostname(), env!("CARGO_PKG_VERSION")],
    )
    .map_err(db_err("recording the capture session"))?;
    Ok(id)
}

/// Records that session `id` was running at `now_ns` (at each commit: after a crash, the
/// last one bounds when the session ended).
pub fn touch(conn: &Connection, id: u64, now_ns: u64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE capture_sessions SET last_seen = ? WHERE id = ?")
        .and_then(|mut st| st.execute(params![ts_value(now_ns), id]))
        .map_err(db_err("updating the capture session"))?;
    Ok(())
}

/// Closes session `id` at `now_ns` (a clean stop).
pub fn stop(conn: &Connection, id: u64, now_ns: u64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE capture_sessions SET stopped = ?, last_seen = ? WHERE id = ?",
        params![ts_value(now_ns), ts_value(now_ns), id],
    )
    .map_err(db_err("closing the capture session"))?;
    Ok(())
}

/// When the session before `id` was last known to be running (its clean stop, or the last
/// commit before a crash), in ns.
pub fn previous_end_ns(conn: &Connection, id: u64) -> Option<u64> {
    conn.query_row(
        "SELECT epoch_us(coalesce(stopped, last_seen)) FROM capture_sessions
         WHERE id < ? ORDER BY id DESC LIMIT 1",
        params![id],
        |r| r.get::<_, i64>(0),
    )
    .ok()
    .map(|us| us.max(0) as u64 * 1_000)
}

/// When the session before `id` made its last commit, in ns, if it ended without a clean stop
/// (killed or crashed).
pub fn unclean_end_ns(conn: &Connection, id: u64) -> Option<u64> {
    conn.query_row(
        "SELECT epoch_us(last_seen), stopped IS NULL FROM capture_sessions
         WHERE id < ? ORDER BY id DESC LIMIT 1",
        params![id],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?)),
    )
    .ok()
    .filter(|(_, unclean)| *unclean)
    .map(|(us, _)| us.max(0) as u64 * 1_000)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| {
            warn!("could not read the hostname");
            String::new()
        })
}
