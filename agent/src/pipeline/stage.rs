//! One stage boundary: a bounded channel whose producers throttle above a high-water mark
//! and, past their limit, either keep waiting or drop the newest item, counting everything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use serde::Serialize;
use tracing::{debug, warn};

use super::metrics::{CounterSet, Field, Kind, Role};

/// Sleep between depth checks while throttled: short, so a recovering consumer is followed
/// closely, long enough not to spin.
const THROTTLE_STEP: Duration = Duration::from_millis(1);

/// What a producer does when the channel stays above its mark past the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Keep waiting: for sources that can be re-read (Docker logs) and must not lose data.
    Wait,
    /// Drop the newest item and count it: for sources that cannot wait (netlink).
    DropNewest,
}

/// Settings of one stage.
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// Name in stats, metrics and warnings, e.g. "conntrack->writer".
    pub name: &'static str,
    /// Channel capacity, in items.
    pub capacity: usize,
    /// Depth above which producers throttle.
    pub high_water: usize,
    /// How long one item may wait above the mark before the overflow policy applies.
    pub max_wait: Duration,
    /// What happens past `max_wait`.
    pub overflow: Overflow,
    /// At most one warning line per interval.
    pub warn_interval: Duration,
}

impl StageConfig {
    /// A stage with the high-water mark at 80% of `capacity` and one warning a minute.
    pub fn new(name: &'static str, capacity: usize, overflow: Overflow) -> Self {
        let capacity = capacity.max(1);
        StageConfig {
            name,
            capacity,
            high_water: (capacity * 4 / 5).max(1),
            max_wait: Duration::from_millis(20),
            overflow,
            warn_interval: Duration::from_secs(60),
        }
    }
}

/// Counters of one stage, shared by its producers, its consumer and the stats readers.
#[derive(Debug, Default)]
pub struct StageStats {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    throttled_ns: AtomicU64,
    depth: AtomicU64,
    peak_depth: AtomicU64,
}

/// A reading of a stage's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StageSnapshot {
    /// Stage name.
    pub name: String,
    /// Items offered by producers.
    pub received: u64,
    /// Items that entered the channel.
    pub forwarded: u64,
    /// Items dropped at overflow.
    pub dropped: u64,
    /// Total time producers spent throttled, in milliseconds.
    pub throttled_ms: u64,
    /// Items in the channel at the last send or receive.
    pub depth: u64,
    /// Highest depth seen.
    pub peak_depth: u64,
    /// Channel capacity.
    pub capacity: u64,
}

/// The rate-limited report: totals since the last line.
#[derive(Debug)]
struct Reporter {
    last: Option<Instant>,
    dropped_at_last: u64,
    throttled_at_last: u64,
    received_at_last: u64,
}

#[derive(Debug)]
struct Shared {
    cfg: StageConfig,
    stats: StageStats,
    reporter: Mutex<Reporter>,
}

impl Shared {
    fn set_depth(&self, depth: usize) {
        let d = depth as u64;
        self.stats.depth.store(d, Ordering::Relaxed);
        self.stats.peak_depth.fetch_max(d, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StageSnapshot {
        let s = &self.stats;
        StageSnapshot {
            name: self.cfg.name.to_string(),
            received: s.received.load(Ordering::Relaxed),
            forwarded: s.forwarded.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            throttled_ms: s.throttled_ns.load(Ordering::Relaxed) / 1_000_000,
            depth: s.depth.load(Ordering::Relaxed),
            peak_depth: s.peak_depth.load(Ordering::Relaxed),
            capacity: self.cfg.capacity as u64,
        }
    }

    /// Emits the totals since the last line if the interval has passed and something
    /// happened: WARN when items were lost, DEBUG when producers only throttled.
    fn report(&self, now: Instant) {
        let Ok(mut r) = self.reporter.try_lock() else {
            return;
        };
        if r.last
            .is_some_and(|l| now.saturating_duration_since(l) < self.cfg.warn_interval)
        {
            return;
        }
        let snap = self.snapshot();
        let throttled_ns = self.stats.throttled_ns.load(Ordering::Relaxed);
        let dropped = snap.dropped - r.dropped_at_last;
        let throttled_ms = (throttled_ns - r.throttled_at_last) / 1_000_000;
        let received = snap.received - r.received_at_last;
        if dropped == 0 && throttled_ns == r.throttled_at_last {
            return;
        }
        let since = r
            .last
            .map(|l| format!("{:.0} s", now.saturating_duration_since(l).as_secs_f64()))
            .unwrap_or_else(|| "start".to_string());
        if dropped > 0 {
            warn!(
                stage = self.cfg.name,
                dropped,
                throttled_ms,
                received,
                depth = snap.depth,
                peak_depth = snap.peak_depth,
                since = %since,
                "backlog full: items dropped"
            );
        } else {
            debug!(
                stage = self.cfg.name,
                throttled_ms,
                received,
                depth = snap.depth,
                peak_depth = snap.peak_depth,
                since = %since,
                "backlog above its mark: producers throttled"
            );
        }
        *r = Reporter {
            last: Some(now),
            dropped_at_last: snap.dropped,
            throttled_at_last: throttled_ns,
            received_at_last: snap.received,
        };
    }
}

/// What became of a sent item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// It is in the channel.
    Forwarded,
    /// The channel stayed full past the limit: it was dropped and counted.
    Dropped,
}

/// The consumer is gone: the stage is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pipeline stage closed: its consumer has stopped")]
pub struct Closed;

/// The producer side of a stage. Clone it for more producers.
#[derive(Debug)]
pub struct StageTx<T> {
    tx: Sender<T>,
    shared: Arc<Shared>,
    episode: Arc<Episode>,
}

/// One overload episode, shared by the producers of a stage: it starts when the depth reaches
/// the high-water mark and ends when it falls below. Producers throttle for at most
/// `max_wait` per episode in total; past that the overflow policy applies to every item until
/// the episode ends. (Throttling each item would cap a source at a few hundred items a
/// second, which for netlink only moves the loss into the kernel.)
#[derive(Debug, Default)]
struct Episode {
    waited_ns: AtomicU64,
    over_limit: AtomicBool,
}

impl Episode {
    fn end(&self) {
        if self.over_limit.load(Ordering::Relaxed) || self.waited_ns.load(Ordering::Relaxed) > 0 {
            self.over_limit.store(false, Ordering::Relaxed);
            self.waited_ns.store(0, Ordering::Relaxed);
        }
    }
}

impl<T> Clone for StageTx<T> {
    fn clone(&self) -> Self {
        StageTx {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
            episode: Arc::clone(&self.episode),
        }
    }
}

/// The consumer side of a stage.
#[derive(Debug)]
pub struct StageRx<T> {
    rx: Receiver<T>,
    shared: Arc<Shared>,
}

/// A handle on a stage's counters for stats and periodic reports.
#[derive(Debug, Clone)]
pub struct StageHandle {
    shared: Arc<Shared>,
}

impl StageHandle {
    /// The stage's counters now.
    pub fn snapshot(&self) -> StageSnapshot {
        self.shared.snapshot()
    }

    /// Emits the rate-limited summary line if one is due.
    pub fn report(&self) {
        self.shared.report(Instant::now());
    }
}

/// The counters of every stage, labelled `stage=<name>` in the registry.
pub const STAGE_FIELDS: &[Field] = &[
    Field::new(
        "received",
        "Items offered to the stage by its producers.",
        Kind::Counter,
        Role::Received,
    ),
    Field::new(
        "forwarded",
        "Items that entered the stage's channel.",
        Kind::Counter,
        Role::Sent,
    ),
    Field::new(
        "dropped",
        "Items dropped because the channel stayed full.",
        Kind::Counter,
        Role::Lost,
    ),
    Field {
        metric: "throttled_seconds",
        scale: 0.001,
        ..Field::new(
            "throttled_ms",
            "Time producers spent throttled, in seconds.",
            Kind::Counter,
            Role::Other,
        )
    },
    Field::new(
        "depth",
        "Items in the channel now.",
        Kind::Gauge,
        Role::Other,
    ),
    Field::new(
        "peak_depth",
        "Highest depth seen.",
        Kind::Gauge,
        Role::Other,
    ),
    Field::new("capacity", "Channel capacity.", Kind::Gauge, Role::Other),
];

impl CounterSet for StageHandle {
    fn fields(&self) -> &'static [Field] {
        STAGE_FIELDS
    }

    fn values(&self) -> Vec<u64> {
        let s = self.snapshot();
        vec![
            s.received,
            s.forwarded,
            s.dropped,
            s.throttled_ms,
            s.depth,
            s.peak_depth,
            s.capacity,
        ]
    }
}

/// Creates a stage.
pub fn stage<T>(cfg: StageConfig) -> (StageTx<T>, StageRx<T>, StageHandle) {
    let (tx, rx) = crossbeam_channel::bounded(cfg.capacity);
    let shared = Arc::new(Shared {
        cfg,
        stats: StageStats::default(),
        reporter: Mutex::new(Reporter {
            last: None,
            dropped_at_last: 0,
            throttled_at_last: 0,
            received_at_last: 0,
        }),
    });
    (
        StageTx {
            tx,
            shared: Arc::clone(&shared),
            episode: Arc::default(),
        },
        StageRx {
            rx,
            shared: Arc::clone(&shared),
        },
        StageHandle { shared },
    )
}

impl<T> StageTx<T> {
    /// Offers an item under the stage's policy: throttle above the mark (within the episode's
    /// budget), then wait or drop.
    pub fn send(&self, item: T) -> Result<Sent, Closed> {
        let mut throttled = Duration::ZERO;
        if self.throttle_needed() {
            loop {
                let start = Instant::now();
                std::thread::sleep(THROTTLE_STEP);
                if self.throttle_step(start.elapsed(), &mut throttled) {
                    break;
                }
            }
        }
        let outcome = match self.shared.cfg.overflow {
            Overflow::Wait => {
                let start = Instant::now();
                self.tx.send(item).map_err(|_| Closed)?;
                throttled += start.elapsed();
                Sent::Forwarded
            }
            Overflow::DropNewest => self.try_forward(item)?,
        };
        self.account(outcome, throttled);
        Ok(outcome)
    }

    /// [`StageTx::send`] for async producers: the throttle and a full `Wait` stage yield to
    /// the runtime (tokio sleeps) instead of blocking its thread, so one slow consumer cannot
    /// stall the other tasks of the runtime (dockerd's events stream among them).
    pub async fn send_async(&self, item: T) -> Result<Sent, Closed> {
        let mut throttled = Duration::ZERO;
        if self.throttle_needed() {
            loop {
                let start = Instant::now();
                tokio::time::sleep(THROTTLE_STEP).await;
                if self.throttle_step(start.elapsed(), &mut throttled) {
                    break;
                }
            }
        }
        let outcome = match self.shared.cfg.overflow {
            Overflow::Wait => {
                let mut item = item;
                loop {
                    match self.tx.try_send(item) {
                        Ok(()) => break Sent::Forwarded,
                        Err(TrySendError::Full(back)) => {
                            item = back;
                            let start = Instant::now();
                            tokio::time::sleep(THROTTLE_STEP).await;
                            throttled += start.elapsed();
                        }
                        Err(TrySendError::Disconnected(_)) => return Err(Closed),
                    }
                }
            }
            Overflow::DropNewest => self.try_forward(item)?,
        };
        self.account(outcome, throttled);
        Ok(outcome)
    }

    /// Counts the item as received; true when the producer should throttle (above the
    /// high-water mark, and this overload episode has not used up its budget).
    fn throttle_needed(&self) -> bool {
        let sh = &*self.shared;
        sh.stats.received.fetch_add(1, Ordering::Relaxed);
        if self.tx.len() < sh.cfg.high_water {
            self.episode.end();
            return false;
        }
        !self.episode.over_limit.load(Ordering::Relaxed)
    }

    /// Records one throttle step; true when throttling is over (below the mark again, or the
    /// episode's budget is spent).
    fn throttle_step(&self, step: Duration, throttled: &mut Duration) -> bool {
        let (sh, ep) = (&*self.shared, &*self.episode);
        *throttled += step;
        let waited = ep
            .waited_ns
            .fetch_add(step.as_nanos() as u64, Ordering::Relaxed)
            + step.as_nanos() as u64;
        if self.tx.len() < sh.cfg.high_water {
            ep.end();
            return true;
        }
        if waited >= sh.cfg.max_wait.as_nanos() as u64 {
            ep.over_limit.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Forwards the item if there is room, else drops it (the DropNewest policy).
    fn try_forward(&self, item: T) -> Result<Sent, Closed> {
        match self.tx.try_send(item) {
            Ok(()) => Ok(Sent::Forwarded),
            Err(TrySendError::Full(_)) => Ok(Sent::Dropped),
            Err(TrySendError::Disconnected(_)) => Err(Closed),
        }
    }

    /// Sends an item that must not be lost (control messages, dump entries), waiting as long
    /// as it takes; the wait counts as throttled time.
    pub fn send_wait(&self, item: T) -> Result<(), Closed> {
        let sh = &*self.shared;
        sh.stats.received.fetch_add(1, Ordering::Relaxed);
        let waited = match self.tx.try_send(item) {
            Ok(()) => Duration::ZERO,
            Err(TrySendError::Full(item)) => {
                let start = Instant::now();
                self.tx.send(item).map_err(|_| Closed)?;
                start.elapsed()
            }
            Err(TrySendError::Disconnected(_)) => return Err(Closed),
        };
        self.account(Sent::Forwarded, waited);
        Ok(())
    }

    fn account(&self, outcome: Sent, throttled: Duration) {
        let sh = &*self.shared;
        match outcome {
            Sent::Forwarded => sh.stats.forwarded.fetch_add(1, Ordering::Relaxed),
            Sent::Dropped => sh.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
        sh.set_depth(self.tx.len());
        if !throttled.is_zero() {
            sh.stats
                .throttled_ns
                .fetch_add(throttled.as_nanos() as u64, Ordering::Relaxed);
        }
        if outcome == Sent::Dropped || !throttled.is_zero() {
            sh.report(Instant::now());
        }
    }

    /// Items in the channel now.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    /// Whether the channel is below its high-water mark (the consumer has caught up).
    pub fn below_mark(&self) -> bool {
        self.tx.len() < self.shared.cfg.high_water
    }

    /// A handle on this stage's counters.
    pub fn handle(&self) -> StageHandle {
        StageHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> StageRx<T> {
    /// What the stage's producers do when it stays full.
    pub fn overflow(&self) -> Overflow {
        self.shared.cfg.overflow
    }

    /// Waits up to `timeout` for the next item.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let r = self.rx.recv_timeout(timeout);
        self.shared.set_depth(self.rx.len());
        r
    }

    /// The next item if one is waiting.
    pub fn try_recv(&self) -> Option<T> {
        self.poll().ok()
    }

    /// The next item, or why there is none: empty now, or every sender gone.
    pub fn poll(&self) -> Result<T, TryRecvError> {
        let r = self.rx.try_recv();
        self.shared.set_depth(self.rx.len());
        r
    }

    /// The channel, for waiting on several stages at once (`crossbeam_channel::Select`).
    pub fn receiver(&self) -> &Receiver<T> {
        &self.rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(overflow: Overflow) -> StageConfig {
        StageConfig {
            max_wait: Duration::from_millis(5),
            ..StageConfig::new("test", 10, overflow)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_async_send_to_a_full_wait_stage_yields_to_the_runtime() {
        use std::sync::atomic::AtomicU32;
        let (tx, rx, h) = stage::<u32>(cfg(Overflow::Wait));
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        // The runtime has one thread: the ticker advances only if the send yields.
        let ticks = Arc::new(AtomicU32::new(0));
        let t = Arc::clone(&ticks);
        let ticker = tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        let consumer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            (0..11)
                .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
                .collect::<Vec<_>>()
        });
        assert!(matches!(tx.send_async(10).await, Ok(Sent::Forwarded)));
        let during = ticks.load(Ordering::Relaxed);
        assert!(during >= 10, "only {during} ticks while the send waited");
        assert_eq!(consumer.join().unwrap(), (0..11).collect::<Vec<u32>>());
        ticker.await.unwrap();
        let snap = h.snapshot();
        assert_eq!((snap.received, snap.forwarded, snap.dropped), (11, 11, 0));
        assert!(snap.throttled_ms >= 50, "{snap:?}");
    }

    #[test]
    fn drop_newest_counts_every_item() {
        let (tx, rx, h) = stage::<u32>(cfg(Overflow::DropNewest));
        let mut dropped = 0;
        for i in 0..25 {
            if tx.send(i).unwrap() == Sent::Dropped {
                dropped += 1;
            }
        }
        let s = h.snapshot();
        assert_eq!((s.received, s.forwarded, s.dropped), (25, 10, dropped));
        assert_eq!(dropped, 15);
        assert_eq!(s.peak_depth, 10);
        // The episode's throttle budget was spent once; the rest were shed at once.
        assert!(s.throttled_ms < 100, "{s:?}");
        // The newest were dropped: the oldest ten are kept, in order.
        let got: Vec<u32> = (0..10)
            .map(|_| rx.recv_timeout(Duration::from_millis(10)).unwrap())
            .collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert_eq!(h.snapshot().depth, 0);
        // Room again: the episode ends and forwarding resumes.
        assert_eq!(tx.send(99).unwrap(), Sent::Forwarded);
        assert!(!tx.episode.over_limit.load(Ordering::Relaxed));
    }

    #[test]
    fn wait_policy_loses_nothing_and_accounts_the_wait() {
        let (tx, rx, h) = stage::<u32>(cfg(Overflow::Wait));
        let consumer = std::thread::spawn(move || {
            let mut n = 0;
            while let Ok(_v) = rx.recv_timeout(Duration::from_millis(500)) {
                std::thread::sleep(Duration::from_micros(200));
                n += 1;
            }
            n
        });
        for i in 0..500 {
            assert_eq!(tx.send(i).unwrap(), Sent::Forwarded);
        }
        drop(tx);
        assert_eq!(consumer.join().unwrap(), 500);
        let s = h.snapshot();
        assert_eq!((s.received, s.forwarded, s.dropped), (500, 500, 0));
        assert!(s.throttled_ms > 0, "{s:?}");
    }

    #[test]
    fn closed_when_the_consumer_is_gone() {
        let (tx, rx, _h) = stage::<u32>(cfg(Overflow::DropNewest));
        drop(rx);
        assert_eq!(tx.send(1), Err(Closed));
        assert_eq!(tx.send_wait(1), Err(Closed));
    }
}
