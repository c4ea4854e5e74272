//! Process rows (`process_events`): executions, forks and exits from the eBPF source. The
//! writer appends them to `process_staging` (a columnar appender: a single-row INSERT costs
//! DuckDB hundreds of µs, and an exec burst lost records to it) and moves them, arguments
//! parsed into a list, at each commit.

use duckdb::Connection;

use super::chunk_appender::ChunkAppender;
use super::event_log::in_transaction;
use super::schema::{StoreError, db_err};
use crate::pipeline::process::{LifeKind, ProcessExec, ProcessLife};

/// The staging table's appender.
pub const STAGING: &str = "process_staging";

/// One row to store.
#[derive(Debug, Clone)]
pub enum ProcessRow {
    /// An exec.
    Exec(Box<ProcessExec>),
    /// A fork or an exit.
    Life(ProcessLife),
}

/// Appends one row to the staging table.
pub fn append(app: &mut ChunkAppender, row: &ProcessRow) -> Result<(), StoreError> {
    app.begin_row()?;
    match row {
        ProcessRow::Exec(ev) => {
            app.set(0, (ev.ts_ns / 1_000) as i64);
            app.set(1, if ev.snapshot { 0u8 } else { 1u8 });
            app.set(2, ev.pid);
            app.set(3, ev.tid);
            app.set(4, ev.ppid);
            app.set(5, ev.uid);
            app.set_str(6, &ev.comm);
            app.set_str(7, &ev.filename);
            app.set(8, ev.filename_truncated);
            app.set_str(
                9,
                &serde_json::to_string(&ev.argv).unwrap_or_else(|_| "[]".into()),
            );
            app.set(10, ev.argv_truncated);
            app.set(11, (ev.start_ns / 1_000) as i64);
            app.set(12, ev.cgroup_id);
            app.set(13, ev.netns);
            app.set(14, ev.mntns);
            app.set_null(15);
        }
        ProcessRow::Life(ev) => {
            app.set(0, (ev.ts_ns / 1_000) as i64);
            app.set(
                1,
                match ev.kind {
                    LifeKind::Fork => 2u8,
                    LifeKind::Exit => 3u8,
                },
            );
            app.set(2, ev.pid);
            app.set_null(3);
            app.set_opt(4, ev.ppid);
            app.set_null(5);
            app.set_str(6, &ev.comm);
            for col in 7..=10 {
                app.set_null(col);
            }
            app.set(11, (ev.start_ns / 1_000) as i64);
            app.set(12, ev.cgroup_id);
            app.set_null(13);
            app.set_null(14);
            app.set_opt(15, ev.wait_status);
        }
    }
    app.end_row();
    Ok(())
}

/// Moves the staged rows into `process_events` (call after the appender's flush). Rows
/// staged before a crash move at the next commit.
pub fn move_staged(conn: &Connection) -> Result<(), StoreError> {
    in_transaction(conn, "moving staged process events", |conn| {
        conn.execute_batch(
            "INSERT INTO process_events
             SELECT make_timestamp(ts_us), kind, pid, tid, ppid, uid, comm, filename,
                    filename_truncated, from_json(argv_json, '[\"VARCHAR\"]'), argv_truncated,
                    make_timestamp(start_us), cgroup_id, netns, mntns, wait_status
             FROM process_staging ORDER BY ts_us;
             DELETE FROM process_staging;",
        )
        .map_err(db_err("moving staged process events"))
    })
}
