//! The agent's status snapshot: per-stage counters, reader and writer counters and recent
//! gaps, written beside the database every second so `nattrail status` can show a running
//! agent's state without opening the database it holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::conntrack::reader::ReaderStats;
use crate::pipeline::stage::StageSnapshot;
use crate::store::gaps::GapRecord;
use crate::store::writer::WriterStats;

/// Everything `nattrail status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Process id of the agent.
    pub pid: u32,
    /// When the agent started (RFC 3339, UTC).
    pub started: String,
    /// When this snapshot was taken (RFC 3339, UTC).
    pub updated: String,
    /// Whether the agent was running when the snapshot was written (false after a clean stop).
    pub running: bool,
    /// Per-stage backlog counters.
    pub stages: Vec<StageSnapshot>,
    /// conntrack reader counters.
    pub conntrack: ReaderCounters,
    /// Writer counters.
    pub writer: WriterCounters,
    /// Capture gaps of the last 24 hours.
    pub gaps_24h: Vec<GapRecord>,
}

/// A reading of [`ReaderStats`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReaderCounters {
    /// Datagrams read from the event socket.
    pub datagrams: u64,
    /// Flow messages decoded.
    pub decoded: u64,
    /// Undecodable messages.
    pub decode_errors: u64,
    /// Flows left out by the capture filter.
    pub filtered: u64,
    /// Events handed to the writer stage.
    pub forwarded: u64,
    /// ENOBUFS seen.
    pub overflows: u64,
    /// Events the kernel dropped on our socket.
    pub kernel_dropped: u64,
    /// Dump entries received.
    pub dumped: u64,
    /// Resyncs after a loss.
    pub resyncs: u64,
}

impl From<&ReaderStats> for ReaderCounters {
    fn from(s: &ReaderStats) -> Self {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        ReaderCounters {
            datagrams: g(&s.datagrams),
            decoded: g(&s.decoded),
            decode_errors: g(&s.decode_errors),
            filtered: g(&s.filtered),
            forwarded: g(&s.forwarded),
            overflows: g(&s.overflows),
            kernel_dropped: g(&s.kernel_dropped),
            dumped: g(&s.dumped),
            resyncs: g(&s.resyncs),
        }
    }
}

/// A reading of [`WriterStats`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriterCounters {
    /// Rows committed.
    pub rows: u64,
    /// Commits.
    pub commits: u64,
    /// Duplicates skipped.
    pub duplicates: u64,
    /// Flows closed by reconciliation.
    pub reconciled: u64,
    /// Flows open now.
    pub open_flows: u64,
    /// Capture gaps recorded.
    pub gaps: u64,
}

impl From<&WriterStats> for WriterCounters {
    fn from(s: &WriterStats) -> Self {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        WriterCounters {
            rows: g(&s.rows),
            commits: g(&s.commits),
            duplicates: g(&s.duplicates),
            reconciled: g(&s.reconciled),
            open_flows: g(&s.open_flows),
            gaps: g(&s.gaps),
        }
    }
}

/// Where the snapshot of the agent using `db` lives.
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".status.json");
    db.with_file_name(name)
}

/// Writes the snapshot atomically (temporary file, then rename).
pub fn write(db: &Path, status: &AgentStatus) -> std::io::Result<()> {
    let path = path_for(db);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, &path)
}

/// Reads the last snapshot, if any.
pub fn read(db: &Path) -> Option<AgentStatus> {
    let body = std::fs::read(path_for(db)).ok()?;
    serde_json::from_slice(&body).ok()
}
