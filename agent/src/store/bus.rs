//! The event bus: every event-log row, published by the writer once it is committed. A
//! subscriber that falls behind loses the oldest events and is told how many (broadcast's
//! `Lagged`), so the writer never waits for a subscriber.

use std::sync::Arc;

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
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(BUS_CAPACITY).0,
        }
    }
}

impl EventBus {
    /// Publishes a committed event; with no subscriber it is simply not delivered.
    pub fn publish(&self, ev: StoredEvent) {
        let _ = self.tx.send(Arc::new(ev));
    }

    /// A new subscription, receiving events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.tx.subscribe()
    }
}
