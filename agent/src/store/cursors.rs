//! Where each container's log was read up to (`log_cursors`): loaded at start so tails resume
//! where the last run stopped; written by the writer together with the hits they cover.

use std::collections::HashMap;

use duckdb::{Connection, params};

use super::schema::{StoreError, db_err};
use crate::pipeline::messages::Pos;

/// Every saved cursor, by container id.
pub fn load(conn: &Connection) -> Result<HashMap<String, Pos>, StoreError> {
    let mut st = conn
        .prepare("SELECT container_id, ts_ns, rank, digest FROM log_cursors")
        .map_err(db_err("reading log cursors"))?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Pos {
                    ts_ns: r.get(1)?,
                    rank: r.get(2)?,
                    digest: r.get(3)?,
                },
            ))
        })
        .map_err(db_err("reading log cursors"))?;
    rows.collect::<Result<_, _>>()
        .map_err(db_err("reading log cursors"))
}

/// Saves the cursor of `container_id` (inside the caller's transaction).
pub fn save(conn: &Connection, container_id: &str, pos: &Pos) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR REPLACE INTO log_cursors VALUES (?, ?, ?, ?, now()::TIMESTAMP)")
        .and_then(|mut st| st.execute(params![container_id, pos.ts_ns, pos.rank, pos.digest]))
        .map(|_| ())
        .map_err(db_err("saving a log cursor"))
}

/// Forgets the cursor of a removed container.
pub fn forget(conn: &Connection, container_id: &str) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM log_cursors WHERE container_id = ?",
        params![container_id],
    )
    .map(|_| ())
    .map_err(db_err("removing a log cursor"))
}
