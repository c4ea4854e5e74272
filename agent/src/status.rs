//! The agent's status snapshot: per-stage counters, reader and writer counters and recent
//! gaps, written beside the database every second so `nattrail status` can show a running
//! agent's state without opening the database it holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{SecondsFormat, Utc};

use serde::{Deserialize, Serialize};

use crate::conntrack::reader::ReaderStats;
use crate::docker::logscan::{LogScan, LogScanCounters};
use crate::pipeline::counters::counters;
use crate::pipeline::registry::Registry;
use crate::pipeline::stage::StageSnapshot;
use crate::store::gaps::GapRecord;
use crate::store::writer::WriterStats;
use crate::triggers::dispatcher::{DispatchCounters, DispatchStats};

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
    /// Container log scanning, when enabled.
    #[serde(default)]
    pub logscan: Option<LogScanCounters>,
    /// Trigger dispatch, when enabled.
    #[serde(default)]
    pub webhooks: Option<DispatchCounters>,
    /// Connections of the API's listeners, when it serves.
    #[serde(default)]
    pub api: Option<ApiConnCounters>,
}

counters! {
    /// Connections of the API's listeners (TCP and the Unix socket together).
    pub struct ApiConnStats =>
    /// A copy of the counters for reports.
    ApiConnCounters {
        /// Connections accepted.
        accepted,
        /// Connections closed to make room: they had not sent a request (slow or idle).
        evicted,
        /// Connections refused because every open one was serving a request.
        refused,
    }
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
    /// Event-log rows written.
    #[serde(default)]
    pub events: u64,
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
            events: g(&s.events),
        }
    }
}

/// Where the snapshot of the agent using `db` lives.
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".status.json");
    db.with_file_name(name)
}

/// Writes the snapshot atomically (temporary file, then rename), private like the trail.
pub fn write(db: &Path, status: &AgentStatus) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    crate::store::files::write_private_atomic(&path_for(db), &body, false)
}

/// Reads the last snapshot, if any.
pub fn read(db: &Path) -> Option<AgentStatus> {
    let body = std::fs::read(path_for(db)).ok()?;
    serde_json::from_slice(&body).ok()
}

/// Where a running agent's counters come from.
#[derive(Debug, Clone)]
pub struct StatusSource {
    /// Agent start, RFC 3339.
    pub started: String,
    /// The stages.
    pub registry: Arc<Registry>,
    /// conntrack reader counters.
    pub reader: Arc<ReaderStats>,
    /// Writer counters.
    pub writer: Arc<WriterStats>,
    /// Log scanning, when enabled.
    pub logscan: Option<Arc<LogScan>>,
    /// Trigger dispatch counters, once the dispatcher runs.
    pub webhooks: Option<Arc<DispatchStats>>,
    /// API connection counters, when the API serves.
    pub api: Option<Arc<ApiConnStats>>,
}

impl StatusSource {
    /// A source for an agent starting now.
    pub fn new(
        registry: Arc<Registry>,
        reader: Arc<ReaderStats>,
        writer: Arc<WriterStats>,
        logscan: Option<Arc<LogScan>>,
    ) -> Self {
        StatusSource {
            started: now_rfc3339(),
            registry,
            reader,
            writer,
            logscan,
            webhooks: None,
            api: None,
        }
    }

    /// The counters now.
    pub fn snapshot(&self, running: bool) -> AgentStatus {
        AgentStatus {
            pid: std::process::id(),
            started: self.started.clone(),
            updated: now_rfc3339(),
            running,
            stages: self.registry.snapshot(),
            conntrack: (&*self.reader).into(),
            writer: (&*self.writer).into(),
            gaps_24h: self
                .writer
                .recent_gaps
                .since(Utc::now().timestamp_micros() - DAY_US),
            logscan: self.logscan.as_ref().map(|l| l.counters()),
            webhooks: self.webhooks.as_ref().map(|w| w.snapshot()),
            api: self.api.as_ref().map(|a| a.snapshot()),
        }
    }
}

/// A day in microseconds: the window of "recent" gaps.
pub const DAY_US: i64 = 86_400_000_000;

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The agent's state as far as this host can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Its snapshot is fresh and its process is alive (or it is answering itself).
    Running,
    /// It stopped cleanly.
    Stopped,
    /// Its last snapshot says running, but it is old or the process is gone.
    Died,
    /// No snapshot beside this database.
    Unknown,
}

/// Size of the database file and its WAL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatabaseInfo {
    /// The file.
    pub path: String,
    /// Its size.
    pub size_bytes: u64,
    /// The write-ahead log's size.
    pub wal_bytes: u64,
}

impl DatabaseInfo {
    /// Reads the sizes of `db` and `db.wal`.
    pub fn of(db: &Path) -> Self {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = db.as_os_str().to_os_string();
        wal.push(".wal");
        DatabaseInfo {
            path: db.display().to_string(),
            size_bytes: size(db),
            wal_bytes: size(Path::new(&wal)),
        }
    }
}

/// What `nattrail status` and `/api/v1/stats` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Whether the agent runs.
    pub agent_state: AgentState,
    /// Its counters (live from a running agent, else its last snapshot).
    pub agent: Option<AgentStatus>,
    /// Database size.
    pub database: DatabaseInfo,
    /// Where the gaps come from: "database" or "agent snapshot".
    pub gaps_from: String,
    /// Capture gaps of the last 24 hours.
    pub gaps_24h: Vec<GapRecord>,
}
