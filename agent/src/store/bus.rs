//! The event bus: every event-log row, published by the writer once it is committed. A
//! subscriber that falls behind loses the oldest events and is told how many (broadcast's
//! `Lagged`), so the writer never waits for a subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it loses some.
pub const BUS_CAPACITY: usize = 4096;

/// A committed row of `event_log`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    /// Its id in `event_log`.
    pub id: u64,
    /// When it happened, ns since the epoch.
    pub ts_ns: u64,
    /// "logscan", "conntrack" or "agent".
    pub source: &'static str,
    /// info, warning, error or critical.
    pub severity: &'static str,
    /// The message.
    pub message: String,
    /// Structured details.
    pub metadata: serde_json::Value,
}

/// The publishing side, held by the writer; cheap to clone for subscribing.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<StoredEvent>>,
    // Connection events are only built and published while a subscriber wants them: at
    // full ingest rate they would cost more than the trail itself.
    flows: Arc<AtomicBool>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(BUS_CAPACITY).0,
            flows: Arc::default(),
        }
    }
}

impl EventBus {
    /// Publishes a committed event; with no subscriber it is simply not delivered.
    pub fn publish(&self, ev: StoredEvent) {
        let _ = self.tx.send(Arc::new(ev));
    }

    /// Whether connection events (source "conntrack") are wanted.
    pub fn flows_wanted(&self) -> bool {
        self.flows.load(Ordering::Relaxed)
    }

    /// Says whether some subscriber matches connection events.
    pub fn want_flows(&self, on: bool) {
        self.flows.store(on, Ordering::Relaxed);
    }

    /// A new subscription, receiving events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.tx.subscribe()
    }
}
