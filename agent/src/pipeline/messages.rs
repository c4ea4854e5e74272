//! The messages that cross a stage boundary: into the writer from every source and from
//! the scan workers, and from the Docker tails to the scan workers.
//! They live here, not in the writer that consumes them, so that sources import the
//! pipeline and never a sink.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::pipeline::flow::FlowEvent;

/// What the writer receives.
#[derive(Debug)]
// Flows are the common case and move by value: boxing them would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum WriterMsg {
    /// A conntrack event and the receive clock's reading (ns since the epoch).
    Flow {
        /// The decoded event.
        ev: FlowEvent,
        /// When the datagram was read.
        received_ns: u64,
    },
    /// A table dump starts: flows open in the trail before this point and absent from the
    /// dump ended while nobody was watching.
    DumpBegin,
    /// The dump is complete. Flows it did not contain are closed with an inexact end in
    /// `[alive_until_ns, at_ns]`.
    DumpEnd {
        /// When the dump finished.
        at_ns: u64,
        /// The last instant those flows were known alive, when known (else their start).
        alive_until_ns: Option<u64>,
    },
    /// A hole in the trail: events lost between `start_ns` and `end_ns`.
    Gap {
        /// Where the loss happened: "conntrack" (kernel socket) or a stage name.
        source: &'static str,
        /// Last instant the stream was known complete.
        start_ns: u64,
        /// When the resync that closed the hole finished.
        end_ns: u64,
        /// Events lost, as counted; None when the count is unknown.
        lost: Option<u64>,
        /// Why.
        reason: &'static str,
    },
    /// An entry of the event log (an agent event).
    Event(LogEvent),
    /// A container's hits and where its log was read up to.
    LogBatch(LogBatch),
    /// A container was removed: its cursor is no longer needed.
    ForgetCursor(String),
    /// A process execution seen by the eBPF exec program.
    Exec(Box<crate::pipeline::process::ProcessExec>),
    /// A process began or ended, seen by the eBPF fork and exit programs.
    Life(crate::pipeline::process::ProcessLife),
    /// A socket's first packet to a destination, seen by the eBPF socket programs.
    Socket(Box<crate::pipeline::process::SocketEvent>),
    /// The eBPF socket programs were attached: flows from now on are attributed or known to
    /// have no local owner.
    SocketsAttached {
        /// When, ns since the epoch.
        at_ns: u64,
    },
    /// A container started, was found running, or ended (the Docker source).
    Container(Box<ContainerSeen>),
    /// Commit now and answer on the channel (tests and orderly shutdown of callers).
    Sync(crossbeam_channel::Sender<()>),
}

/// One run of a container, as Docker describes it: what sockets and flows are attributed to
/// over the interval it ran (a container's address passes to the next one at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSeen {
    /// Full id.
    pub id: String,
    /// Name, without Docker's leading '/'.
    pub name: String,
    /// Image, as the container was created from it.
    pub image: String,
    /// Its workload's most specific name.
    pub workload: String,
    /// When this run started, ns since the epoch.
    pub started_ns: u64,
    /// When it ended; None while running.
    pub ended_ns: Option<u64>,
    /// Its cgroup v2 id, where its tasks have a cgroup of their own in the v2 hierarchy.
    pub cgroup_id: Option<u64>,
    /// Its network namespace inode.
    pub netns: Option<u32>,
    /// Its addresses on Docker's networks.
    pub addresses: Vec<std::net::IpAddr>,
}

/// A container's hits and the log position after the lines that produced them, stored in
/// one transaction: a restart resumes after them, never before (repeated hits) nor past
/// uncommitted ones (lost hits).
#[derive(Debug)]
pub struct LogBatch {
    /// The container.
    pub container_id: String,
    /// Its hits, in line order.
    pub hits: Vec<LogEvent>,
    /// Where its log was read up to.
    pub cursor: Option<Pos>,
}

/// A row of `event_log`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    /// When it happened, ns since the epoch.
    pub ts_ns: u64,
    /// "logscan", "conntrack" or "agent".
    pub source: &'static str,
    /// info, warning, error or critical.
    pub severity: &'static str,
    /// At most 500 bytes.
    pub message: String,
    /// Structured details.
    pub metadata: serde_json::Value,
}

/// A position in a container's log: the last record consumed, by Docker's timestamp and its
/// rank among the records carrying that same timestamp, with a digest of its text to check
/// the log was not rewritten under us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Pos {
    /// Docker's timestamp, ns since the epoch.
    pub ts_ns: i64,
    /// 1 for the first record with this timestamp, 2 for the next, ...
    pub rank: u32,
    /// FNV-1a of the record's text (after the timestamp, without the newline).
    pub digest: u64,
}

impl Pos {
    /// Docker's `since` for resuming here: records at this very instant are sent again and
    /// skipped by rank.
    pub fn since_param(&self) -> String {
        format!(
            "{}.{:09}",
            self.ts_ns.div_euclid(1_000_000_000),
            self.ts_ns.rem_euclid(1_000_000_000)
        )
    }
}

/// Which stream a payload belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output (and all of a TTY container's output).
    Stdout,
    /// Standard error.
    Stderr,
}

/// One complete line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Docker's timestamp of its first record; None when it was missing or invalid.
    pub ts: Option<DateTime<Utc>>,
    /// The text, valid UTF-8, without the newline.
    pub text: String,
    /// The line was longer than the cap and was cut.
    pub truncated: bool,
    /// Where the stream stands once this line is consumed: resuming from here neither
    /// repeats nor skips a line. None until a record with a valid timestamp was read.
    pub end: Option<Pos>,
}

/// One container, as inspected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerInfo {
    /// Full id.
    pub id: String,
    /// Name, without Docker's leading '/'.
    pub name: String,
    /// Names of its workload, most specific first: the values of the workload labels, the
    /// compose service, the container name. A rule scoped to any of them applies.
    pub workloads: Vec<String>,
    /// Started with a TTY: its output is one raw stream, counted as stdout.
    pub tty: bool,
    /// Running when inspected.
    pub running: bool,
}

/// What a tail sends to its worker.
#[derive(Debug)]
pub enum ScanMsg {
    /// Lines of one container, in log order, and the position once they are consumed.
    Lines {
        /// The container.
        container: Arc<ContainerInfo>,
        /// Its lines and their streams.
        lines: Vec<(Stream, Line)>,
        /// Where its log stands after them (None: unchanged).
        cursor: Option<Pos>,
    },
    /// The container was removed: drop its state and its saved position.
    Removed(String),
}
