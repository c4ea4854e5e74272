//! The agent's stages by name, for `status`, the stats endpoint and periodic reports.

use std::sync::Mutex;

use super::stage::{StageHandle, StageSnapshot};

/// Every stage the agent created.
#[derive(Debug, Default)]
pub struct Registry {
    stages: Mutex<Vec<StageHandle>>,
}

impl Registry {
    /// Adds a stage.
    pub fn add(&self, h: StageHandle) {
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
