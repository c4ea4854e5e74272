//! Log scanning as the rest of the agent sees it: the rules in force (reloaded from the
//! database after every change) and the counters of tails, discovery and scanning.

use std::sync::Arc;

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::source::{SourceCounters, SourceStats};
use super::tail::{TailCounters, TailStats};
use crate::pipeline::metrics::{CounterSet, Field, Kind, Metrics, Role};
use crate::scan::engine::{CompileError, ScanCounters, ScanStats};
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
    /// Scan counters: lines, hits, and matches held back.
    #[serde(flatten)]
    pub scan: ScanCounters,
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
        LogScanCounters {
            scan: self.scan.snapshot(),
            compile_errors: self.live.load().errors().to_vec(),
            tails: self.tails.snapshot(),
            discovery: self.source.snapshot(),
        }
    }

    /// Registers the counters of scanning, tails and discovery.
    pub fn register(&self, metrics: &Metrics) {
        metrics.register(ScanStats::COMPONENT, None, self.scan.clone());
        metrics.register(TailStats::COMPONENT, None, self.tails.clone());
        metrics.register(SourceStats::COMPONENT, None, self.source.clone());
        metrics.register(
            RULES_COMPONENT,
            None,
            Arc::new(RuleCounters(Arc::clone(&self.live))),
        );
    }
}

/// The rules in force, as the registry reads them.
struct RuleCounters(Arc<LiveRules>);

/// The component name of the rules' counters.
pub const RULES_COMPONENT: &str = "logscan_rules";

/// The counters of the rules in force.
pub const RULE_FIELDS: &[Field] = &[Field::new(
    "compile_errors",
    "Rules whose pattern does not compile.",
    Kind::Gauge,
    Role::Other,
)];

impl CounterSet for RuleCounters {
    fn fields(&self) -> &'static [Field] {
        RULE_FIELDS
    }
    fn values(&self) -> Vec<u64> {
        vec![self.0.load().errors().len() as u64]
    }
}

impl std::fmt::Debug for LogScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogScan")
            .field("rules_version", &self.live.load().version())
            .finish_non_exhaustive()
    }
}
