//! The agent's status snapshot: per-stage counters, reader and writer counters and recent
//! gaps, written beside the database every second so `nattrail status` can show a running
//! agent's state without opening the database it holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};

use serde::{Deserialize, Serialize};

use crate::conntrack::reader::{ReaderCounters, ReaderStats};
use crate::docker::logscan::{LogScan, LogScanCounters, RULE_FIELDS, RULES_COMPONENT};
use crate::docker::source::SourceStats;
use crate::docker::tail::TailStats;
use crate::ebpf::source::{EbpfCounters, EbpfStats};
use crate::pipeline::metrics::{CounterSet, Field, Kind, Metrics, Role, counters};
use crate::pipeline::registry::Registry;
use crate::pipeline::stage::{STAGE_FIELDS, StageSnapshot};
use crate::scan::engine::ScanStats;
use crate::store::gaps::{GapRecord, RecentGaps};
use crate::store::writer::{WriterCounters, WriterStats};
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
    /// The eBPF programs, when enabled.
    #[serde(default)]
    pub ebpf: Option<EbpfStatus>,
}

/// The eBPF programs: whether they run, why not, and their counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EbpfStatus {
    /// Whether the programs are attached.
    pub running: bool,
    /// Why they are not, when they are not.
    pub error: Option<String>,
    /// Their counters.
    #[serde(flatten)]
    pub counters: EbpfCounters,
}

counters! {
    /// Connections of the API's listeners (TCP and the Unix socket together).
    pub struct ApiConnStats as "api" =>
    /// A copy of the counters for reports.
    ApiConnCounters {
        /// Connections accepted.
        accepted: Counter(Received),
        /// Connections closed to make room: they had not sent a request (slow or idle).
        evicted: Counter(Skipped),
        /// Connections refused because every open one was serving a request.
        refused: Counter(Skipped),
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
    /// Every component's counters.
    pub metrics: Arc<Metrics>,
    /// Gaps of the last day.
    pub recent_gaps: Arc<RecentGaps>,
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
    /// The eBPF source's counters and, when it did not start, why.
    pub ebpf: Option<(Arc<EbpfStats>, Option<String>)>,
}

impl StatusSource {
    /// A source for an agent starting now; registers the reader's, writer's and log
    /// scanning's counters in `metrics` (the stages registered themselves).
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        reader: Arc<ReaderStats>,
        writer: Arc<WriterStats>,
        recent_gaps: Arc<RecentGaps>,
        logscan: Option<Arc<LogScan>>,
    ) -> Self {
        metrics.register(ReaderStats::COMPONENT, None, reader.clone());
        metrics.register(WriterStats::COMPONENT, None, writer.clone());
        if let Some(l) = &logscan {
            l.register(&metrics);
        }
        StatusSource {
            started: now_rfc3339(),
            registry,
            metrics,
            recent_gaps,
            reader,
            writer,
            logscan,
            webhooks: None,
            api: None,
            ebpf: None,
        }
    }

    /// Adds the eBPF source's counters, and why it is off when it is.
    pub fn with_ebpf(&mut self, stats: Arc<EbpfStats>, error: Option<String>) {
        self.metrics
            .register(EbpfStats::COMPONENT, None, stats.clone());
        self.ebpf = Some((stats, error));
    }

    /// Adds the trigger dispatcher's counters.
    pub fn with_webhooks(&mut self, stats: Arc<DispatchStats>) {
        self.metrics
            .register(DispatchStats::COMPONENT, None, stats.clone());
        self.webhooks = Some(stats);
    }

    /// Adds the API's connection counters.
    pub fn with_api(&mut self, stats: Arc<ApiConnStats>) {
        self.metrics
            .register(ApiConnStats::COMPONENT, None, stats.clone());
        self.api = Some(stats);
    }

    /// Adds the size of the database files `db`, read at each scrape.
    pub fn with_database(&self, db: &Path) {
        self.metrics.register(
            DATABASE_COMPONENT,
            None,
            Arc::new(DatabaseFiles(db.to_path_buf())),
        );
    }

    /// The counters now.
    pub fn snapshot(&self, running: bool) -> AgentStatus {
        AgentStatus {
            pid: std::process::id(),
            started: self.started.clone(),
            updated: now_rfc3339(),
            running,
            stages: self.registry.snapshot(),
            conntrack: self.reader.snapshot(),
            writer: self.writer.snapshot(),
            gaps_24h: self
                .recent_gaps
                .since(Utc::now().timestamp_micros() - DAY_US),
            logscan: self.logscan.as_ref().map(|l| l.counters()),
            webhooks: self.webhooks.as_ref().map(|w| w.snapshot()),
            api: self.api.as_ref().map(|a| a.snapshot()),
            ebpf: self.ebpf.as_ref().map(|(s, e)| EbpfStatus {
                running: e.is_none(),
                error: e.clone(),
                counters: s.snapshot(),
            }),
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
    /// Reads the sizes of `db` and its WAL (beside the file a link names).
    pub fn of(db: &Path) -> Self {
        use crate::store::database::{resolved, wal_path};
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        DatabaseInfo {
            path: db.display().to_string(),
            size_bytes: size(db),
            wal_bytes: size(&wal_path(&resolved(db))),
        }
    }
}

/// The component name of the database files' sizes.
const DATABASE_COMPONENT: &str = "database";

/// The database files, as the registry reads them: their sizes at each scrape.
struct DatabaseFiles(PathBuf);

const DATABASE_FIELDS: &[Field] = &[
    Field::new(
        "size_bytes",
        "Size of the DuckDB file.",
        Kind::Gauge,
        Role::Other,
    ),
    Field::new(
        "wal_bytes",
        "Size of its write-ahead log.",
        Kind::Gauge,
        Role::Other,
    ),
];

impl CounterSet for DatabaseFiles {
    fn fields(&self) -> &'static [Field] {
        DATABASE_FIELDS
    }
    fn values(&self) -> Vec<u64> {
        let d = DatabaseInfo::of(&self.0);
        vec![d.size_bytes, d.wal_bytes]
    }
}

/// Every component that can register counters, with its declared fields and where its
/// section sits in `status --json` (a path of object keys; `stages` is a list by name).
pub fn catalogue() -> Vec<(&'static str, &'static [Field], &'static [&'static str])> {
    vec![
        ("stage", STAGE_FIELDS, &["agent", "stages"]),
        (
            ReaderStats::COMPONENT,
            ReaderStats::FIELDS,
            &["agent", "conntrack"],
        ),
        (
            WriterStats::COMPONENT,
            WriterStats::FIELDS,
            &["agent", "writer"],
        ),
        (
            ScanStats::COMPONENT,
            ScanStats::FIELDS,
            &["agent", "logscan"],
        ),
        (
            TailStats::COMPONENT,
            TailStats::FIELDS,
            &["agent", "logscan", "tails"],
        ),
        (
            SourceStats::COMPONENT,
            SourceStats::FIELDS,
            &["agent", "logscan", "discovery"],
        ),
        (RULES_COMPONENT, RULE_FIELDS, &["agent", "logscan"]),
        (
            DispatchStats::COMPONENT,
            DispatchStats::FIELDS,
            &["agent", "webhooks"],
        ),
        (
            ApiConnStats::COMPONENT,
            ApiConnStats::FIELDS,
            &["agent", "api"],
        ),
        (EbpfStats::COMPONENT, EbpfStats::FIELDS, &["agent", "ebpf"]),
        (DATABASE_COMPONENT, DATABASE_FIELDS, &["database"]),
    ]
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
