//! The agent's stages by name, for `status`, the stats endpoint and periodic reports.

use std::sync::{Arc, Mutex};

use super::metrics::Metrics;
use super::stage::{StageHandle, StageSnapshot};

/// Every stage the agent created.
#[derive(Debug, Default)]
pub struct Registry {
    stages: Mutex<Vec<StageHandle>>,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// Stages whose counters also go to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Registry {
            stages: Mutex::default(),
            metrics,
        }
    }

    /// Adds a stage, and its counters to the metrics registry (labelled with its name).
    pub fn add(&self, h: StageHandle) {
        let name = h.snapshot().name;
        self.metrics
            .register("stage", Some(("stage", name)), Arc::new(h.clone()));
        self.stages.lock().expect("registry lock").push(h);
    }

    /// Counters of every stage, in creation order.
    pub fn snapshot(&self) -> Vec<StageSnapshot> {
        self.stages
            .lock()
            .expect("registry lock")
            .iter()
            .map(StageHandle::snapshot)
            .collect()
    }

    /// Emits the due rate-limited summary lines, so a burst's totals are reported even when
    /// nothing is sent afterwards.
    pub fn report(&self) {
        for h in self.stages.lock().expect("registry lock").iter() {
            h.report();
        }
    }
}
