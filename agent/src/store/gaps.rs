//! Capture gaps as records: what the writer remembers of recent ones and what `status` shows.

use std::collections::VecDeque;
use std::sync::Mutex;

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::schema::{StoreError, db_err};
use super::timestamp::Micros;
use crate::pipeline::clock::rfc3339_us;

/// How many recent gaps the writer keeps in memory for status snapshots.
const KEEP: usize = 1_000;

/// One capture gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapRecord {
    /// Where events were lost.
    pub source: String,
    /// Window start, RFC 3339 UTC.
    pub start: String,
    /// Window end, RFC 3339 UTC.
    pub end: String,
    /// Window start in µs since the epoch.
    pub start_us: i64,
    /// Window end in µs since the epoch.
    #[serde(default, skip_serializing)]
    pub end_us: i64,
    /// Events lost, when counted.
    pub lost: Option<u64>,
    /// Why.
    pub reason: String,
}

impl GapRecord {
    /// Builds a record from µs timestamps.
    pub fn new(source: &str, start_us: i64, end_us: i64, lost: Option<u64>, reason: &str) -> Self {
        GapRecord {
            source: source.to_string(),
            start: rfc3339_us(start_us),
            end: rfc3339_us(end_us),
            start_us,
            end_us,
            lost,
            reason: reason.to_string(),
        }
    }
}

/// A row of (source, start, end, lost, reason).
fn gap_of(r: &duckdb::Row<'_>) -> duckdb::Result<GapRecord> {
    let source: String = r.get(0)?;
    let reason: String = r.get(4)?;
    Ok(GapRecord::new(
        &source,
        r.get::<_, Micros>(1)?.0,
        r.get::<_, Micros>(2)?.0,
        r.get(3)?,
        &reason,
    ))
}

/// Gaps overlapping `[lo_us, hi_us]`, oldest first: the one reading of `capture_gaps`,
/// for `status` and for `who`'s coverage. Ordered by position: DuckDB binds an ORDER BY on a
/// name by printing it, which makes a CLI process build its keyword table (a second parse of
/// its grammar, 5-7 ms).
pub fn overlapping(conn: &Connection, lo_us: i64, hi_us: i64) -> duckdb::Result<Vec<GapRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT source, start, \"end\", lost, reason FROM capture_gaps
         WHERE start <= ? AND \"end\" >= ? ORDER BY 2",
    )?;
    let rows = stmt.query_map([Micros(hi_us), Micros(lo_us)], gap_of)?;
    rows.collect()
}

/// Up to `n` gaps in no order, read by a statement without parameters (planned once per
/// connection): for a reader that keeps them while they are few.
pub fn first(conn: &Connection, n: usize) -> duckdb::Result<Vec<GapRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT source, start, \"end\", lost, reason FROM capture_gaps LIMIT {n}"
    ))?;
    let rows = stmt.query_map([], gap_of)?;
    rows.collect()
}

/// Gaps that ended at or after `since_us`, oldest first.
pub fn since(conn: &Connection, since_us: i64) -> Result<Vec<GapRecord>, StoreError> {
    overlapping(conn, since_us, i64::MAX).map_err(db_err("reading capture gaps"))
}

/// The most recent gaps, bounded, shared between the writer and the status snapshot.
#[derive(Debug, Default)]
pub struct RecentGaps(Mutex<VecDeque<GapRecord>>);

impl RecentGaps {
    /// Remembers a gap, forgetting the oldest beyond the bound.
    pub fn push(&self, g: GapRecord) {
        let mut q = self.0.lock().expect("recent gaps lock");
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back(g);
    }

    /// Gaps that started at or after `since_us`.
    pub fn since(&self, since_us: i64) -> Vec<GapRecord> {
        self.0
            .lock()
            .expect("recent gaps lock")
            .iter()
            .filter(|g| g.start_us >= since_us)
            .cloned()
            .collect()
    }
}
