//! The trigger dispatcher: subscribes to the event bus, matches each event against the
//! enabled triggers, applies each trigger's rate limit and queues a webhook delivery. It
//! never writes to the event log (a delivery cannot cause an event that causes a delivery);
//! events it missed by falling behind the bus, and deliveries dropped by its full queue, are
//! counted. At stop it drains what the bus still holds and sends what is queued for a grace
//! period; deliveries still unsent then are abandoned, counted and logged as such.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::json;
use tokio::runtime::Handle;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};

use super::delivery::{Deliverer, DeliveryConfig, Outcome, Target};
use super::filter::CompiledFilter;
use super::ssrf::Guard;
use crate::pipeline::metrics::counters;
use crate::pipeline::service::Service;
use crate::store::bus::{EventBus, StoredEvent};
use crate::store::database::Database;
use crate::store::schema::db_err;
use crate::triggers::trigger_store::{self as triggers, DeliveryRecord, Trigger, TriggerError};

counters! {
    /// Counters of the dispatcher.
    pub struct DispatchStats as "webhooks" =>
    /// A copy of the counters for reports.
    DispatchCounters {
        /// Events read from the bus.
        events: Counter(Received),
        /// Events the bus dropped before the dispatcher read them.
        missed: Counter(Lost),
        /// (event, trigger) pairs that matched.
        matched: Counter,
        /// Matches held back by a trigger's rate limit.
        rate_limited: Counter(Skipped),
        /// Deliveries dropped because the queue was full.
        dropped: Counter(Lost),
        /// Deliveries that got a 2xx.
        delivered: Counter(Sent),
        /// Deliveries that failed, were refused, or ended in 410.
        failed: Counter(Lost),
        /// Deliveries still queued or in flight when the stop's grace period ran out.
        abandoned: Counter(Lost),
    }
}

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Deliveries waiting to be sent before new ones are dropped.
    pub queue_capacity: usize,
    /// Deliveries in flight at once.
    pub workers: usize,
    /// Retries and timeouts.
    pub delivery: DeliveryConfig,
    /// How long a stop waits for queued and in-flight deliveries.
    pub grace: Duration,
}

struct Active {
    trigger: Trigger,
    filter: CompiledFilter,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
}

/// The rate limiter of trigger `t`: the one it had before a reload when its rate is
/// unchanged, so that a change to any trigger refills no bucket (keyed by trigger id).
fn limiter_for(before: &[Arc<Active>], t: &Trigger) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rate = NonZeroU32::new(t.rate_per_min)?;
    before
        .iter()
        .find(|a| a.trigger.id == t.id && a.trigger.rate_per_min == t.rate_per_min)
        .and_then(|a| a.limiter.clone())
        .or_else(|| Some(Arc::new(RateLimiter::direct(Quota::per_minute(rate)))))
}

struct Job {
    trigger: Arc<Active>,
    event: Arc<StoredEvent>,
}

/// The webhook body: the event and the trigger that matched it.
pub fn payload(t: &Trigger, ev: &StoredEvent) -> serde_json::Value {
    json!({
        "type": format!("nattrail.{}", ev.source),
        "trigger": {"id": t.id, "name": t.name},
        "event": {
            "id": ev.id,
            "ts": chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(ev.ts_ns as i64)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "source": ev.source,
            "severity": ev.severity,
            "message": ev.message,
            "metadata": ev.metadata,
        }
    })
}

/// A test delivery of `t`: its webhook-id and a body of the real shape, for an agent event.
pub fn sample(t: &Trigger) -> (String, Vec<u8>) {
    let ev = StoredEvent {
        id: 0,
        ts_ns: crate::pipeline::clock::now_ns(),
        source: "agent",
        severity: "info",
        message: format!("test delivery of trigger {}", t.name),
        metadata: json!({"test": true}),
    };
    let body = serde_json::to_vec(&payload(t, &ev)).expect("payloads serialise");
    (format!("test_{}_{}", t.id, ev.ts_ns), body)
}

/// The shared state of a running dispatcher.
pub struct Dispatcher {
    db: Arc<Database>,
    bus: EventBus,
    active: ArcSwap<Vec<Arc<Active>>>,
    deliverer: Deliverer,
    log: mpsc::Sender<LogRow>,
    /// Counters.
    pub stats: Arc<DispatchStats>,
}

impl Dispatcher {
    /// Re-reads the triggers; new events are matched against them at once.
    pub fn reload(&self) -> Result<(), TriggerError> {
        let conn = self.db.connect()?;
        let before = self.active.load_full();
        let mut out = Vec::new();
        for t in triggers::list(&conn, &self.db.secrets())? {
            if !t.enabled {
                continue;
            }
            let filter = match t.filter.clone().compile() {
                Ok(f) => f,
                Err(message) => {
                    // Refused when saved; a stored bad regex can only come from outside.
                    warn!(trigger = %t.name, error = %message, "trigger skipped");
                    continue;
                }
            };
            let limiter = limiter_for(&before, &t);
            out.push(Arc::new(Active {
                trigger: t,
                filter,
                limiter,
            }));
        }
        // Connection events are built only while a trigger could match one (info, conntrack).
        let flows = out.iter().any(|a| {
            let f = a.filter.filter();
            (f.sources.is_empty() || f.sources.iter().any(|s| s == "conntrack"))
                && (f.severities.is_empty()
                    || f.severities.contains(&crate::scan::rules::Severity::Info))
        });
        self.bus.want_flows(flows);
        self.active.store(Arc::new(out));
        Ok(())
    }

    /// Sends a sample delivery of `t` now (the API's and CLI's test), logged like any other.
    pub async fn test(&self, t: &Trigger) -> Outcome {
        let (id, body) = sample(t);
        let out = self.deliverer.deliver(&target(t), &id, &body).await;
        self.record(t, None, &id, Some(&out)).await;
        out
    }

    /// Logs a delivery's end; `None` is one the stop abandoned.
    async fn record(
        &self,
        t: &Trigger,
        event_id: Option<u64>,
        webhook_id: &str,
        out: Option<&Outcome>,
    ) {
        let Some(out) = out else {
            self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
            let error = "the agent stopped before the delivery ended".to_string();
            self.log_row(t, event_id, webhook_id, ("abandoned", None, Some(error), 0))
                .await;
            return;
        };
        let row = match out {
            Outcome::Delivered { status, attempts } => {
                ("delivered", Some(*status), None, *attempts)
            }
            Outcome::Gone { attempts } => ("gone", Some(410), None, *attempts),
            Outcome::Refused { error } => ("refused", None, Some(error.clone()), 0),
            Outcome::Failed {
                status,
                error,
                attempts,
            } => ("failed", *status, Some(error.clone()), *attempts),
        };
        match out {
            Outcome::Delivered { .. } => &self.stats.delivered,
            _ => &self.stats.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.log_row(t, event_id, webhook_id, row).await;
        if matches!(out, Outcome::Gone { .. }) {
            info!(trigger = %t.name, "receiver answered 410 Gone: trigger disabled");
            if let Err(e) = self.reload() {
                warn!(error = %e, "could not reload triggers");
            }
        }
    }

    /// Appends (outcome, status, error, attempts) to the delivery log; "gone" also disables
    /// the trigger.
    async fn log_row(
        &self,
        t: &Trigger,
        event_id: Option<u64>,
        webhook_id: &str,
        (outcome, status, error, attempts): (&'static str, Option<u16>, Option<String>, u32),
    ) {
        let rec = DeliveryRecord {
            trigger_id: t.id,
            event_id,
            webhook_id: webhook_id.to_string(),
            attempts,
            outcome,
            status,
            error,
        };
        let (done, written) = oneshot::channel();
        if self.log.send(LogRow { rec, done }).await.is_err() {
            warn!(
                webhook_id,
                "the delivery log has stopped: a delivery went unlogged"
            );
            return;
        }
        match written.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not log a webhook delivery"),
            Err(_) => warn!(
                webhook_id,
                "the delivery log stopped before writing a delivery"
            ),
        }
    }
}

/// A delivery-log row on its way to the database, and who waits for it to be written.
struct LogRow {
    rec: DeliveryRecord,
    done: oneshot::Sender<Result<(), String>>,
}

/// Delivery-log rows at most in one transaction.
const MAX_LOG_ROWS_PER_COMMIT: usize = 256;

/// Writes delivery-log rows, those that queued up behind a commit together in the next
/// (a commit costs milliseconds; one per delivery would cap the delivery rate). A "gone"
/// row also disables its trigger, in the same transaction.
async fn write_delivery_log(db: Arc<Database>, mut rx: mpsc::Receiver<LogRow>) {
    while let Some(first) = rx.recv().await {
        let mut rows = vec![first];
        while rows.len() < MAX_LOG_ROWS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => rows.push(r),
                Err(_) => break,
            }
        }
        let (recs, waiting): (Vec<_>, Vec<_>) = rows.into_iter().map(|r| (r.rec, r.done)).unzip();
        let db = Arc::clone(&db);
        let res = tokio::task::spawn_blocking(move || -> Result<(), TriggerError> {
            let mut c = db.connect()?;
            let tx = c
                .transaction()
                .map_err(db_err("starting a delivery-log transaction"))?;
            for rec in &recs {
                triggers::log_delivery(&tx, rec)?;
                if rec.outcome == "gone" {
                    triggers::disable(&tx, rec.trigger_id, "the receiver answered 410 Gone")?;
                }
            }
            tx.commit()
                .map_err(db_err("committing delivery-log rows"))?;
            Ok(())
        })
        .await;
        let res = match res {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the delivery-log task failed: {e}")),
        };
        for done in waiting {
            let _ = done.send(res.clone());
        }
    }
}

/// Where and how `t` delivers.
pub fn target(t: &Trigger) -> Target {
    Target {
        url: t.url.clone(),
        secret: t.secret.clone(),
        headers: t.headers.clone(),
    }
}

/// A running dispatcher thread.
pub struct DispatchHandle {
    /// The dispatcher (reload, test, counters).
    pub dispatcher: Arc<Dispatcher>,
    service: Service,
}

impl DispatchHandle {
    /// Stops matching, sends what is queued within the grace period and logs the rest as
    /// abandoned.
    pub fn stop(self) {
        self.service.stop();
    }
}

/// Loads the triggers and starts dispatching events from `bus`, on `rt`.
pub fn start(
    rt: &Handle,
    db: Arc<Database>,
    bus: &EventBus,
    guard: Arc<Guard>,
    cfg: DispatchConfig,
) -> Result<DispatchHandle, TriggerError> {
    let deliverer = Deliverer::new(guard, cfg.delivery.clone()).map_err(|e| {
        TriggerError::Store(crate::store::schema::StoreError::Native {
            context: "building the webhook client".into(),
            detail: e.to_string(),
        })
    })?;
    let (log, log_rx) = mpsc::channel(MAX_LOG_ROWS_PER_COMMIT);
    let dispatcher = Arc::new(Dispatcher {
        db: Arc::clone(&db),
        bus: bus.clone(),
        active: ArcSwap::from_pointee(Vec::new()),
        deliverer,
        log,
        stats: Arc::default(),
    });
    dispatcher.reload()?;
    let mut rx = bus.subscribe();
    let d = Arc::clone(&dispatcher);
    let service = Service::spawn(rt, move |mut stopped| async move {
        {
            tokio::spawn(write_delivery_log(db, log_rx));
            let (qtx, qrx) = mpsc::channel::<Job>(cfg.queue_capacity.max(1));
            let qrx = Arc::new(tokio::sync::Mutex::new(qrx));
            let (give_up_tx, give_up) = watch::channel(false);
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..cfg.workers.max(1) {
                let (d, qrx, mut give_up) = (Arc::clone(&d), Arc::clone(&qrx), give_up.clone());
                workers.spawn(async move {
                    loop {
                        let job = qrx.lock().await.recv().await;
                        let Some(job) = job else { break };
                        let t = &job.trigger.trigger;
                        // Stable across retries: one event, one trigger, one id.
                        let id = format!("evt_{}_{}", job.event.id, t.id);
                        let body = serde_json::to_vec(&payload(t, &job.event))
                            .expect("payloads serialise");
                        let to = target(t);
                        let out = if *give_up.borrow() {
                            None
                        } else {
                            tokio::select! {
                                out = d.deliverer.deliver(&to, &id, &body) => Some(out),
                                _ = give_up.wait_for(|g| *g) => None,
                            }
                        };
                        d.record(t, Some(job.event.id), &id, out.as_ref()).await;
                    }
                });
            }
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(ev) => d.dispatch(ev, &qtx),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            d.stats.missed.fetch_add(n, Ordering::Relaxed);
                            warn!(missed = n, "trigger dispatcher fell behind the event bus");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = stopped.wait_for(|s| *s) => break,
                }
            }
            // Events committed just before the stop are still on the bus.
            loop {
                match rx.try_recv() {
                    Ok(ev) => d.dispatch(ev, &qtx),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        d.stats.missed.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            drop(qtx);
            let drained = async { while workers.join_next().await.is_some() {} };
            if tokio::time::timeout(cfg.grace, drained).await.is_err() {
                let _ = give_up_tx.send(true);
                while workers.join_next().await.is_some() {}
                let n = d.stats.abandoned.load(Ordering::Relaxed);
                warn!(
                    abandoned = n,
                    grace = ?cfg.grace,
                    "webhook deliveries abandoned at stop"
                );
            }
        }
    });
    Ok(DispatchHandle {
        dispatcher,
        service,
    })
}

impl Dispatcher {
    fn dispatch(&self, ev: Arc<StoredEvent>, queue: &mpsc::Sender<Job>) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        for a in self.active.load().iter() {
            if !a.filter.matches(&ev) {
                continue;
            }
            self.stats.matched.fetch_add(1, Ordering::Relaxed);
            if a.limiter.as_ref().is_some_and(|l| l.check().is_err()) {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let job = Job {
                trigger: Arc::clone(a),
                event: Arc::clone(&ev),
            };
            if queue.try_send(job).is_err() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;
    use crate::triggers::filter::Filter;
    use crate::triggers::trigger_store::NewTrigger;

    type Got = Arc<Mutex<Vec<serde_json::Value>>>;

    async fn receiver(status: u16) -> (String, Got) {
        slow_receiver(status, Duration::ZERO).await
    }

    /// A receiver that notes each body, then answers `status` after `delay`.
    async fn slow_receiver(status: u16, delay: Duration) -> (String, Got) {
        let got: Got = Arc::default();
        let app = Router::new()
            .route(
                "/h",
                post(move |State(g): State<Got>, b: Bytes| async move {
                    g.lock().unwrap().push(serde_json::from_slice(&b).unwrap());
                    tokio::time::sleep(delay).await;
                    StatusCode::from_u16(status).unwrap()
                }),
            )
            .with_state(Arc::clone(&got));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/h", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (url, got)
    }

    fn ev(id: u64, severity: &'static str) -> StoredEvent {
        StoredEvent {
            id,
            ts_ns: 1_795_000_000_000_000_000,
            source: "logscan",
            severity,
            message: format!("line {id}"),
            metadata: json!({"container": "web"}),
        }
    }

    async fn wait(mut f: impl FnMut() -> bool) {
        for _ in 0..100 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn matching_events_are_delivered_rate_limited_and_logged() {
        let dir = std::env::temp_dir().join(format!("nattrail-disp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Arc::new(Database::open_rw(&dir.join("t.duckdb")).unwrap());
        let guard = Arc::new(Guard::new(vec!["127.0.0.1/32".parse().unwrap()]));
        let (url, got) = receiver(200).await;
        let (gone_url, gone_got) = receiver(410).await;
        {
            let c = db.connect().unwrap();
            triggers::insert(&c, &db.secrets(), &error_trigger("errors", &url, 2), &guard).unwrap();
            triggers::insert(
                &c,
                &db.secrets(),
                &error_trigger("gone", &gone_url, 0),
                &guard,
            )
            .unwrap();
        }
        let bus = EventBus::default();
        let h = start(
            &Handle::current(),
            Arc::clone(&db),
            &bus,
            guard,
            DispatchConfig {
                queue_capacity: 16,
                workers: 2,
                delivery: DeliveryConfig::default(),
                grace: Duration::from_secs(5),
            },
        )
        .unwrap();
        bus.publish(ev(1, "info"));
        for i in 2..7 {
            bus.publish(ev(i, "error"));
        }
        let stats = Arc::clone(&h.dispatcher.stats);
        wait(|| {
            stats.delivered.load(Ordering::Relaxed) == 2
                && stats.failed.load(Ordering::Relaxed) >= 1
        })
        .await;
        let s = stats.snapshot();
        // 5 errors match "errors" (2 pass its 2/min limit) and "gone" (first delivery
        // disables it); the info event matches nothing.
        assert_eq!(s.events, 6);
        assert_eq!(s.rate_limited, 3);
        assert_eq!(s.delivered, 2);
        let bodies = got.lock().unwrap().clone();
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[0]["type"], "nattrail.logscan");
        assert_eq!(bodies[0]["trigger"]["name"], "errors");
        assert!(bodies[0]["event"]["ts"].as_str().unwrap().ends_with('Z'));
        assert!(!gone_got.lock().unwrap().is_empty());
        wait(|| {
            let c = db.connect().unwrap();
            triggers::resolve(&c, &db.secrets(), "gone").is_ok_and(|t| !t.enabled)
        })
        .await;
        let c = db.connect().unwrap();
        let t = triggers::resolve(&c, &db.secrets(), "gone").unwrap();
        assert!(!t.enabled, "410 disables the trigger");
        let delivered: i64 = c
            .query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE outcome = 'delivered'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(delivered, 2);
        h.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reload_keeps_each_triggers_rate_limit_by_id() {
        let trigger = |id, rate| Trigger {
            id,
            name: format!("t{id}"),
            enabled: true,
            filter: Filter::default(),
            rate_per_min: rate,
            url: "https://hooks.example.org/x".into(),
            secret: None,
            headers: BTreeMap::new(),
            disabled_reason: None,
        };
        let active = |t: Trigger, before: &[Arc<Active>]| {
            Arc::new(Active {
                limiter: limiter_for(before, &t),
                filter: Filter::default().compile().unwrap(),
                trigger: t,
            })
        };
        let first = vec![active(trigger(1, 1), &[]), active(trigger(2, 5), &[])];
        let spent = first[0].limiter.as_ref().unwrap();
        assert!(spent.check().is_ok());
        assert!(spent.check().is_err(), "one delivery a minute");
        // Trigger 2 changes (its rate): trigger 1's bucket stays empty, trigger 2 gets a new one.
        let second = [active(trigger(1, 1), &first), active(trigger(2, 6), &first)];
        let kept = second[0].limiter.as_ref().unwrap();
        assert!(
            Arc::ptr_eq(kept, spent) && kept.check().is_err(),
            "bucket refilled"
        );
        assert!(!Arc::ptr_eq(
            second[1].limiter.as_ref().unwrap(),
            first[1].limiter.as_ref().unwrap()
        ));
        // A rate of 0 has no limiter.
        assert!(limiter_for(&second, &trigger(3, 0)).is_none());
    }

    /// A trigger on every error event, to `url`.
    fn error_trigger(name: &str, url: &str, rate_per_min: u32) -> NewTrigger {
        NewTrigger {
            name: name.into(),
            url: url.into(),
            secret: None,
            filter: Filter {
                severities: vec![crate::scan::rules::Severity::Error],
                ..Default::default()
            },
            rate_per_min,
            headers: BTreeMap::new(),
            enabled: true,
        }
    }

    /// Starts a dispatcher with one worker and one trigger on every error event, to `url`.
    fn one_trigger(
        name: &str,
        url: &str,
        grace: Duration,
    ) -> (Arc<Database>, EventBus, DispatchHandle) {
        let dir = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Arc::new(Database::open_rw(&dir.join("t.duckdb")).unwrap());
        let guard = Arc::new(Guard::new(vec!["127.0.0.1/32".parse().unwrap()]));
        let t = error_trigger(name, url, 0);
        triggers::insert(&db.connect().unwrap(), &db.secrets(), &t, &guard).unwrap();
        let bus = EventBus::default();
        let cfg = DispatchConfig {
            queue_capacity: 16,
            workers: 1,
            delivery: DeliveryConfig::default(),
            grace,
        };
        let h = start(&Handle::current(), Arc::clone(&db), &bus, guard, cfg).unwrap();
        (db, bus, h)
    }

    fn outcomes(db: &Database) -> Vec<(String, i64)> {
        let c = db.connect().unwrap();
        let mut st = c
            .prepare("SELECT outcome, count(*) FROM webhook_deliveries GROUP BY 1 ORDER BY 1")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stop_sends_what_the_bus_and_queue_still_hold() {
        let (url, got) = slow_receiver(200, Duration::from_millis(200)).await;
        let (db, bus, h) = one_trigger("drain", &url, Duration::from_secs(10));
        for i in 1..=3 {
            bus.publish(ev(i, "error"));
        }
        // At once: the events may still be on the bus, and a delivery takes 200 ms.
        let stats = Arc::clone(&h.dispatcher.stats);
        tokio::task::spawn_blocking(move || h.stop()).await.unwrap();
        let s = stats.snapshot();
        assert_eq!((s.delivered, s.abandoned), (3, 0), "{s:?}");
        assert_eq!(got.lock().unwrap().len(), 3);
        assert_eq!(outcomes(&db), vec![("delivered".to_string(), 3)]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn deliveries_outliving_the_grace_are_abandoned_and_logged() {
        let (url, got) = slow_receiver(200, Duration::from_secs(60)).await;
        let (db, bus, h) = one_trigger("abandon", &url, Duration::from_millis(300));
        for i in 1..=3 {
            bus.publish(ev(i, "error"));
        }
        wait(|| !got.lock().unwrap().is_empty()).await;
        let stats = Arc::clone(&h.dispatcher.stats);
        let t0 = std::time::Instant::now();
        tokio::task::spawn_blocking(move || h.stop()).await.unwrap();
        // One in flight (the receiver holds it 60 s) and two queued: none waits past the grace.
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "stop took {:?}",
            t0.elapsed()
        );
        let s = stats.snapshot();
        assert_eq!((s.delivered, s.abandoned), (0, 3), "{s:?}");
        assert_eq!(got.lock().unwrap().len(), 1);
        assert_eq!(outcomes(&db), vec![("abandoned".to_string(), 3)]);
    }
}
