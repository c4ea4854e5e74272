//! Log scanning as the rest of the agent sees it: the rules in force (reloaded from the
//! database after every change) and the counters of tails, discovery and scanning.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::source::{SourceCounters, SourceStats};
use super::tail::{TailCounters, TailStats};
use crate::scan::engine::{CompileError, ScanStats};
use crate::scan::live::LiveRules;
use crate::scan::rule_store::{self as rules, RuleError};

/// The log-scan side of a running agent.
pub struct LogScan {
    /// The rules in force.
    pub live: Arc<LiveRules>,
    /// Scan counters.
    pub scan: Arc<ScanStats>,
    /// Tail counters.
    pub tails: Arc<TailStats>,
    /// Discovery counters.
    pub source: Arc<SourceStats>,
}

/// What `/api/v1/stats` and `nattrail status` show of log scanning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogScanCounters {
    /// Lines scanned.
    pub lines_seen: u64,
    /// Hits stored.
    pub hits: u64,
    /// Matches held back by a rule's cooldown.
    pub suppressed_cooldown: u64,
    /// Matches held back by a container's token bucket.
    pub suppressed_bucket: u64,
    /// Tails running.
    pub active_tails: u64,
    /// Rules whose pattern does not compile, with the compiler's message.
    pub compile_errors: Vec<CompileError>,
    /// Line and frame counters of the tails.
    pub tails: TailCounters,
    /// Discovery counters.
    pub discovery: SourceCounters,
}

impl LogScan {
    /// Log scanning with the rules stored in the database.
    pub fn load(conn: &Connection) -> Result<Self, RuleError> {
        let (r, o) = rules::list(conn)?;
        Ok(LogScan {
            live: Arc::new(LiveRules::new(r, o)),
            scan: Arc::default(),
            tails: Arc::default(),
            source: Arc::default(),
        })
    }

    /// Re-reads the rules after a change; tails use them from their next line.
    pub fn reload(&self, conn: &Connection) -> Result<(), RuleError> {
        let (r, o) = rules::list(conn)?;
        self.live.replace(r, o);
        Ok(())
    }

    /// The counters now.
    pub fn counters(&self) -> LogScanCounters {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let source = self.source.snapshot();
        LogScanCounters {
            lines_seen: g(&self.scan.lines),
            hits: g(&self.scan.hits),
            suppressed_cooldown: g(&self.scan.suppressed_cooldown),
            suppressed_bucket: g(&self.scan.suppressed_bucket),
            active_tails: source.active_tails,
            compile_errors: self.live.load().errors().to_vec(),
            tails: self.tails.snapshot(),
            discovery: source,
        }
    }
}

impl std::fmt::Debug for LogScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogScan")
            .field("rules_version", &self.live.load().version())
            .finish_non_exhaustive()
    }
}
