//! Scan workers: each owns a share of the containers (by id), scans their lines against the
//! rules in force and hands hits and read positions to the writer, in order.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::engine::{ContainerScanner, Hit, ScanStats};
use super::live::{LiveRules, WorkloadView};
use crate::pipeline::clock::now_ns;
use crate::pipeline::messages::Pos;
use crate::pipeline::messages::{Line, ScanMsg};
use crate::pipeline::messages::{LogBatch, LogEvent, WriterMsg};
use crate::pipeline::stage::{StageRx, StageTx};

/// Source name of log-rule hits in the event log.
pub const SOURCE_LOGSCAN: &str = "logscan";

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Token-bucket rate per container, hits/s.
    pub hits_per_sec: NonZeroU32,
    /// Token-bucket burst.
    pub hits_burst: NonZeroU32,
    /// A position without hits is saved at most this often per container.
    pub cursor_interval: Duration,
}

struct ContainerState {
    scanner: ContainerScanner,
    view: WorkloadView,
    unsaved: Option<Pos>,
    saved_at: Instant,
}

/// Runs one worker until every tail's sender is gone; then saves the last positions.
pub fn run(
    rx: StageRx<ScanMsg>,
    writer: StageTx<WriterMsg>,
    live: Arc<LiveRules>,
    stats: Arc<ScanStats>,
    cfg: WorkerConfig,
) {
    let mut containers: HashMap<String, ContainerState> = HashMap::new();
    // Quiet containers' positions are swept this often, not after every message.
    let sweep_every = cfg.cursor_interval.min(Duration::from_millis(250));
    let mut swept_at = Instant::now();
    loop {
        match rx.recv_timeout(sweep_every) {
            Ok(ScanMsg::Lines {
                container,
                lines,
                cursor,
            }) => {
                let st = containers
                    .entry(container.id.clone())
                    .or_insert_with(|| ContainerState {
                        scanner: ContainerScanner::new(
                            container.workload(),
                            &container.name,
                            cfg.hits_per_sec,
                            cfg.hits_burst,
                        ),
                        view: live.view(&container.workloads),
                        unsaved: None,
                        saved_at: Instant::now(),
                    });
                let mut hits = Vec::new();
                for (stream, line) in &lines {
                    let rules = st.view.current();
                    let logged_ns = logged_ns(line);
                    for hit in st
                        .scanner
                        .scan(rules, &line.text, *stream, logged_ns, &stats)
                    {
                        hits.push(log_event(hit, logged_ns));
                    }
                }
                if cursor.is_some() {
                    st.unsaved = cursor;
                }
                if !hits.is_empty() || st.saved_at.elapsed() >= cfg.cursor_interval {
                    st.saved_at = Instant::now();
                    let msg = WriterMsg::LogBatch(LogBatch {
                        container_id: container.id.clone(),
                        hits,
                        cursor: st.unsaved.take(),
                    });
                    if writer.send_wait(msg).is_err() {
                        return;
                    }
                }
            }
            Ok(ScanMsg::Removed(id)) => {
                containers.remove(&id);
                if writer.send_wait(WriterMsg::ForgetCursor(id)).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if swept_at.elapsed() >= sweep_every {
            swept_at = Instant::now();
            save_due(&mut containers, &writer, cfg.cursor_interval);
        }
    }
    save_due(&mut containers, &writer, Duration::ZERO);
}

/// Saves the positions of containers that have been quiet for `after`.
fn save_due(
    containers: &mut HashMap<String, ContainerState>,
    writer: &StageTx<WriterMsg>,
    after: Duration,
) {
    for (id, st) in containers.iter_mut() {
        if st.unsaved.is_some() && st.saved_at.elapsed() >= after {
            st.saved_at = Instant::now();
            let _ = writer.send_wait(WriterMsg::LogBatch(LogBatch {
                container_id: id.clone(),
                hits: Vec::new(),
                cursor: st.unsaved.take(),
            }));
        }
    }
}

/// When `line` was logged: Docker's timestamp (ours is only when it was read), or now when
/// the record had none.
fn logged_ns(line: &Line) -> u64 {
    line.ts
        .and_then(|t| t.timestamp_nanos_opt())
        .map(|n| n.max(0) as u64)
        .unwrap_or_else(now_ns)
}

fn log_event(hit: Hit, logged_ns: u64) -> LogEvent {
    LogEvent {
        ts_ns: logged_ns,
        source: SOURCE_LOGSCAN,
        severity: hit.severity.as_str(),
        message: hit.message,
        metadata: hit.metadata,
    }
}
