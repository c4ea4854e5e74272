//! The one writer thread: owns the read-write connection, appends rows in order of receipt
//! and commits on a row-count or time bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use duckdb::ffi;
// The open-flow map is touched for every event; SipHash showed up at 3% of ingest.
use duckdb::types::{TimeUnit, Value};
use duckdb::{Connection, params};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use tracing::{debug, info, warn};

use super::bus::{EventBus, StoredEvent};
use super::chunk_appender::{ChunkAppender, Micros};
use super::cursors;
use super::database::{Database, OpenOptions};
use super::gaps::{GapRecord, RecentGaps};
use super::schema::{StoreError, db_err};
use crate::pipeline::clock::now_ns;
use crate::pipeline::flow::{Addr, EventKind, FlowEvent, TimeSource, Tuple, proto_name};
use crate::pipeline::messages::{LogBatch, LogEvent, Pos, WriterMsg};
use crate::pipeline::stage::StageRx;

/// Counters of the writer, readable from other threads.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Rows appended to `conntrack_events`.
    pub rows: AtomicU64,
    /// Commits (appender flushes).
    pub commits: AtomicU64,
    /// NEW or dump entries skipped because the flow was already open in the trail.
    pub duplicates: AtomicU64,
    /// Flows closed by reconciliation with an inexact end.
    pub reconciled: AtomicU64,
    /// Flows open in the trail right now.
    pub open_flows: AtomicU64,
    /// Capture gaps recorded.
    pub gaps: AtomicU64,
    /// Event-log rows written.
    pub events: AtomicU64,
    /// Transactions that stored log hits and cursors (several batches share one under load).
    pub log_commits: AtomicU64,
    /// Gaps of the last day (loaded at open) and those recorded since.
    pub recent_gaps: RecentGaps,
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Database file.
    pub db_path: PathBuf,
    /// Commit after this many rows.
    pub batch_rows: usize,
    /// Commit at least this often.
    pub commit_interval: Duration,
    /// DuckDB's memory limit, in MiB (buffer pool and appender buffers).
    pub memory_limit_mb: u64,
    /// Test only: extra time spent per message, to stall the writer behind its input.
    pub stall_per_message: Duration,
}

impl WriterConfig {
    /// The writer settings of an agent configuration.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        WriterConfig {
            db_path: cfg.db_path.clone(),
            batch_rows: cfg.store.batch_rows,
            commit_interval: Duration::from_millis(cfg.store.commit_interval_ms),
            memory_limit_mb: cfg.store.memory_limit_mb,
            stall_per_message: Duration::ZERO,
        }
    }
}

/// Identity of a live conntrack entry: its zone, original tuple and kernel id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    ct_id: u32,
    zone: u16,
    proto: u8,
    orig: Tuple,
}

impl FlowKey {
    fn of(ev: &FlowEvent) -> Self {
        FlowKey {
            ct_id: ev.ct_id,
            zone: ev.zone,
            proto: ev.proto,
            orig: ev.orig,
        }
    }
}

/// What the writer remembers of an open flow, enough to write an inexact DESTROY row.
#[derive(Clone, Copy, Debug)]
struct OpenFlow {
    reply: Tuple,
    family: u8,
    mark: u32,
    status: u32,
    start_ns: Option<u64>,
    /// Dump generation at insertion: flows added after a dump began are not judged by it.
    generation: u64,
}

fn ts_value(ns: u64) -> Value {
    Value::Timestamp(TimeUnit::Microsecond, (ns / 1_000) as i64)
}

fn micros(ns: u64) -> Micros {
    Micros((ns / 1_000) as i64)
}

/// Log batches stored in one transaction at most.
const MAX_LOG_BATCHES_PER_COMMIT: usize = 256;

/// The column types of `conntrack_events`, in table order, as the appender writes them.
const CONNTRACK_COLUMNS: [ffi::DUCKDB_TYPE; 29] = {
    use ffi::{
        DUCKDB_TYPE_DUCKDB_TYPE_BOOLEAN as BOOL, DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP as TS,
        DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT as U64, DUCKDB_TYPE_DUCKDB_TYPE_UHUGEINT as U128,
        DUCKDB_TYPE_DUCKDB_TYPE_UINTEGER as U32, DUCKDB_TYPE_DUCKDB_TYPE_USMALLINT as U16,
        DUCKDB_TYPE_DUCKDB_TYPE_UTINYINT as U8,
    };
    [
        U64, TS, U8, U8, U8, U8, U16, U32, U32, U32, U128, U128, U16, U16, U128, U128, U16, U16,
        TS, TS, TS, BOOL, U64, U64, U64, U64, U8, U8, U8,
    ]
};

/// The writer's state, separated from the thread so tests and benchmarks can drive it.
pub struct Writer {
    // Field order is drop order: the appender and connection go before the database.
    app: ChunkAppender,
    conn: Connection,
    db: Arc<Database>,
    next_seq: u64,
    open: HashMap<FlowKey, OpenFlow>,
    generation: u64,
    dump: Option<(u64, HashSet<FlowKey>)>,
    pending: usize,
    session_id: u64,
    stats: Arc<WriterStats>,
    bus: EventBus,
    // Connection events of the open commit, published once it is committed.
    unpublished: Vec<StoredEvent>,
}

impl Writer {
    /// Opens (and migrates) the database, loads the open flows and starts a capture session.
    pub fn open(cfg: &WriterConfig, stats: Arc<WriterStats>) -> Result<Self, StoreError> {
        let db = Database::open(
            &cfg.db_path,
            OpenOptions {
                read_only: false,
                memory_limit_mb: Some(cfg.memory_limit_mb),
            },
        )?;
        let conn = db.connect()?;
        let app = db.appender("conntrack_events")?;
        app.expect_types(&CONNTRACK_COLUMNS)?;
        let next_seq: u64 = conn
            .query_row(
                "SELECT coalesce(max(seq) + 1, 0)::UBIGINT FROM conntrack_events",
                [],
                |r| r.get(0),
            )
            .map_err(db_err("reading the last sequence number"))?;
        let session_id: u64 = conn
            .query_row(
                "SELECT coalesce(max(id) + 1, 1)::UBIGINT FROM capture_sessions",
                [],
                |r| r.get(0),
            )
            .map_err(db_err("reading capture sessions"))?;
        let now = ts_value(now_ns());
        conn.execute(
            "INSERT INTO capture_sessions VALUES (?, ?, NULL, ?, ?, ?)",
            params![
                session_id,
                now.clone(),
                now,
                hostname(),
                env!("CARGO_PKG_VERSION")
            ],
        )
        .map_err(db_err("recording the capture session"))?;
        let mut w = Writer {
            app,
            conn,
            db: Arc::new(db),
            next_seq,
            open: HashMap::new(),
            generation: 1,
            dump: None,
            pending: 0,
            session_id,
            stats,
            bus: EventBus::default(),
            unpublished: Vec::new(),
        };
        w.load_open_flows()?;
        let day_ago = (now_ns() / 1_000) as i64 - 86_400_000_000;
        for g in super::gaps::since(&w.conn, day_ago)? {
            w.stats.recent_gaps.push(g);
        }
        Ok(w)
    }

    /// The bus the writer publishes committed events on.
    pub fn bus(&self) -> EventBus {
        self.bus.clone()
    }

    /// The database, for read connections (the query service).
    pub fn database(&self) -> Arc<Database> {
        Arc::clone(&self.db)
    }

    /// The capture session this writer records.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// When the previous capture session was last known to be running (its clean stop, or
    /// the last commit before a crash): the lower bound for flows that ended meanwhile.
    pub fn previous_session_end_ns(&self) -> Option<u64> {
        self.conn
            .query_row(
                "SELECT epoch_us(coalesce(stopped, last_seen)) FROM capture_sessions
                 WHERE id < ? ORDER BY id DESC LIMIT 1",
                params![self.session_id],
                |r| r.get::<_, i64>(0),
            )
            .ok()
            .map(|us| us.max(0) as u64 * 1_000)
    }

    fn load_open_flows(&mut self) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT s.ct_id, s.zone, s.proto, s.orig_src, s.orig_dst, s.orig_sport, s.orig_dport,
                        s.reply_src, s.reply_dst, s.reply_sport, s.reply_dport, s.family, s.mark,
                        s.status, epoch_us(coalesce(s.start_ts, s.ts))
                 FROM conntrack_events s
                 WHERE s.kind IN (1, 3) AND NOT EXISTS (
                    SELECT 1 FROM conntrack_events d
                    WHERE d.kind = 2 AND d.ct_id = s.ct_id AND d.zone = s.zone AND d.proto = s.proto
                      AND d.orig_src = s.orig_src AND d.orig_sport = s.orig_sport
                      AND d.orig_dst = s.orig_dst AND d.orig_dport = s.orig_dport
                      AND d.seq > s.seq)",
            )
            .map_err(db_err("preparing the open-flow query"))?;
        let rows = stmt
            .query_map([], |r| {
                let key = FlowKey {
                    ct_id: r.get(0)?,
                    zone: r.get(1)?,
                    proto: r.get(2)?,
                    orig: Tuple {
                        src: Addr(r.get(3)?),
                        dst: Addr(r.get(4)?),
                        sport: r.get(5)?,
                        dport: r.get(6)?,
                    },
                };
                let start_us: i64 = r.get(14)?;
                let open = OpenFlow {
                    reply: Tuple {
                        src: Addr(r.get(7)?),
                        dst: Addr(r.get(8)?),
                        sport: r.get(9)?,
                        dport: r.get(10)?,
                    },
                    family: r.get(11)?,
                    mark: r.get(12)?,
                    status: r.get(13)?,
                    start_ns: Some(start_us.max(0) as u64 * 1_000),
                    generation: 0,
                };
                Ok((key, open))
            })
            .map_err(db_err("loading open flows"))?;
        for row in rows {
            let (k, v) = row.map_err(db_err("loading open flows"))?;
            self.open.insert(k, v);
        }
        self.stats
            .open_flows
            .store(self.open.len() as u64, Ordering::Relaxed);
        if !self.open.is_empty() {
            info!(open = self.open.len(), "flows open in the trail at start");
        }
        Ok(())
    }

    /// Handles one message, appending rows through `app`. Returns the rows appended.
    fn handle(&mut self, msg: WriterMsg) -> Result<usize, StoreError> {
        match msg {
            WriterMsg::Flow { ev, received_ns } => self.flow(ev, received_ns),
            WriterMsg::DumpBegin => {
                self.dump = Some((self.generation, HashSet::new()));
                self.generation += 1;
                Ok(0)
            }
            WriterMsg::DumpEnd {
                at_ns,
                alive_until_ns,
            } => self.dump_end(at_ns, alive_until_ns),
            WriterMsg::Gap {
                source,
                start_ns,
                end_ns,
                lost,
                reason,
            } => {
                self.conn
                    .execute(
                        "INSERT INTO capture_gaps VALUES (?, ?, ?, ?, ?, ?)",
                        params![
                            self.session_id,
                            source,
                            ts_value(start_ns),
                            ts_value(end_ns.max(start_ns)),
                            lost,
                            reason
                        ],
                    )
                    .map_err(db_err("recording a capture gap"))?;
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                self.stats.recent_gaps.push(GapRecord::new(
                    source,
                    (start_ns / 1_000) as i64,
                    (end_ns.max(start_ns) / 1_000) as i64,
                    lost,
                    reason,
                ));
                let stored = self.insert_event(LogEvent {
                    ts_ns: start_ns,
                    source: "agent",
                    severity: "warning",
                    message: format!(
                        "capture gap in {source}: {} events lost ({reason})",
                        lost.map(|n| n.to_string())
                            .unwrap_or_else(|| "unknown".into())
                    ),
                    metadata: serde_json::json!({
                        "kind": "capture_gap",
                        "source": source,
                        "lost": lost,
                        "reason": reason,
                        "end_ns": end_ns.max(start_ns),
                    }),
                })?;
                self.bus.publish(stored);
                warn!(
                    source,
                    lost = lost
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    window_ms = end_ns.saturating_sub(start_ns) / 1_000_000,
                    reason,
                    "capture gap recorded"
                );
                Ok(0)
            }
            WriterMsg::Event(e) => {
                let stored = self.insert_event(e)?;
                self.bus.publish(stored);
                Ok(1)
            }
            WriterMsg::LogBatch(b) => self.log_batches(vec![b]),
            WriterMsg::ForgetCursor(id) => {
                cursors::forget(&self.conn, &id)?;
                Ok(0)
            }
            WriterMsg::Sync(_) => Ok(0),
        }
    }

    /// Stores the hits and cursors of several `LogBatch`es in one transaction (one commit,
    /// however many arrived while the last one was written), then publishes the hits.
    fn log_batches(&mut self, batches: Vec<LogBatch>) -> Result<usize, StoreError> {
        let stored = self.in_transaction("storing log hits", |w| {
            let mut stored = Vec::new();
            // Only each container's last position matters.
            let mut last: HashMap<String, Pos> = HashMap::new();
            for LogBatch {
                container_id,
                hits,
                cursor,
            } in batches
            {
                for h in hits {
                    stored.push(w.insert_event(h)?);
                }
                if let Some(pos) = cursor {
                    last.insert(container_id, pos);
                }
            }
            for (id, pos) in &last {
                cursors::save(&w.conn, id, pos)?;
            }
            Ok(stored)
        })?;
        self.stats.log_commits.fetch_add(1, Ordering::Relaxed);
        let n = stored.len();
        for ev in stored {
            self.bus.publish(ev);
        }
        Ok(n)
    }

    /// Inserts one event-log row (hits are rate-limited upstream: a cached statement does,
    /// no appender). Counted once committed by the caller's transaction or autocommit.
    fn insert_event(&mut self, e: LogEvent) -> Result<StoredEvent, StoreError> {
        let id: u64 = self
            .conn
            .prepare_cached(
                "INSERT INTO event_log (ts, source, severity, message, metadata)
                 VALUES (?, ?, ?, ?, ?::JSON) RETURNING id",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![
                        ts_value(e.ts_ns),
                        e.source,
                        e.severity,
                        e.message,
                        e.metadata.to_string()
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(db_err("writing an event-log row"))?;
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        Ok(StoredEvent {
            id,
            ts_ns: e.ts_ns,
            source: e.source,
            severity: e.severity,
            message: e.message,
            metadata: e.metadata,
        })
    }

    /// Runs `f` in one transaction on the writer's connection (the appender's rows are not
    /// touched: it only flushes in `commit`).
    fn in_transaction<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn
            .execute_batch("BEGIN TRANSACTION")
            .map_err(db_err(what))?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT").map_err(db_err(what))?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn flow(&mut self, ev: FlowEvent, received_ns: u64) -> Result<usize, StoreError> {
        let key = FlowKey::of(&ev);
        match ev.kind {
            EventKind::Update => return Ok(0),
            EventKind::New | EventKind::Dump => {
                if let Some((_, seen)) = self.dump.as_mut().filter(|_| ev.kind == EventKind::Dump) {
                    seen.insert(key);
                }
                if self.open.contains_key(&key) {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    return Ok(0);
                }
                self.open.insert(
                    key,
                    OpenFlow {
                        reply: ev.reply,
                        family: ev.family,
                        mark: ev.mark,
                        status: ev.status,
                        start_ns: ev.start_ns.or(ev.event_ns).or(Some(received_ns)),
                        generation: self.generation,
                    },
                );
            }
            EventKind::Destroy => {
                self.open.remove(&key);
            }
        }
        let (ts, source) = ev.event_time(received_ns);
        self.append(&ev, ts, source, None, false)?;
        if ev.kind != EventKind::Dump && self.bus.flows_wanted() {
            self.unpublished
                .push(flow_event(&ev, self.next_seq - 1, ts));
        }
        Ok(1)
    }

    fn dump_end(&mut self, at_ns: u64, alive_until_ns: Option<u64>) -> Result<usize, StoreError> {
        let Some((dump_gen, seen)) = self.dump.take() else {
            return Ok(0);
        };
        let gone: Vec<(FlowKey, OpenFlow)> = self
            .open
            .iter()
            .filter(|(k, v)| v.generation <= dump_gen && !seen.contains(k))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, flow) in &gone {
            self.open.remove(key);
            let ev = FlowEvent {
                kind: EventKind::Destroy,
                family: flow.family,
                proto: key.proto,
                orig: key.orig,
                reply: flow.reply,
                ct_id: key.ct_id,
                zone: key.zone,
                mark: flow.mark,
                status: flow.status,
                tcp_state: None,
                icmp: None,
                counters_orig: None,
                counters_reply: None,
                start_ns: flow.start_ns,
                stop_ns: None,
                event_ns: None,
            };
            let lo = alive_until_ns.max(flow.start_ns).map(|lo| lo.min(at_ns));
            self.append(&ev, at_ns, TimeSource::Receive, lo, true)?;
        }
        if !gone.is_empty() {
            info!(
                closed = gone.len(),
                "flows in the trail were gone from the conntrack table; closed with inexact end"
            );
            self.stats
                .reconciled
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
        }
        Ok(gone.len())
    }

    fn append(
        &mut self,
        ev: &FlowEvent,
        ts_ns: u64,
        source: TimeSource,
        end_lo_ns: Option<u64>,
        inexact: bool,
    ) -> Result<(), StoreError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let app = &mut self.app;
        app.begin_row()?;
        app.set(0, seq);
        app.set(1, micros(ts_ns));
        app.set(2, source as u8);
        app.set(3, ev.kind as u8);
        app.set(4, ev.family);
        app.set(5, ev.proto);
        app.set(6, ev.zone);
        app.set(7, ev.ct_id);
        app.set(8, ev.mark);
        app.set(9, ev.status);
        app.set(10, ev.orig.src.0);
        app.set(11, ev.orig.dst.0);
        app.set(12, ev.orig.sport);
        app.set(13, ev.orig.dport);
        app.set(14, ev.reply.src.0);
        app.set(15, ev.reply.dst.0);
        app.set(16, ev.reply.sport);
        app.set(17, ev.reply.dport);
        app.set_opt(18, ev.start_ns.map(micros));
        app.set_opt(19, ev.stop_ns.map(micros));
        app.set_opt(20, end_lo_ns.map(micros));
        app.set(21, inexact);
        app.set_opt(22, ev.counters_orig.map(|c| c.packets));
        app.set_opt(23, ev.counters_orig.map(|c| c.bytes));
        app.set_opt(24, ev.counters_reply.map(|c| c.packets));
        app.set_opt(25, ev.counters_reply.map(|c| c.bytes));
        app.set_opt(26, ev.tcp_state);
        app.set_opt(27, ev.icmp.map(|i| i.0));
        app.set_opt(28, ev.icmp.map(|i| i.1));
        app.end_row();
        self.pending += 1;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.app.flush()?;
        for ev in self.unpublished.drain(..) {
            self.bus.publish(ev);
        }
        self.conn
            .execute(
                "UPDATE capture_sessions SET last_seen = ? WHERE id = ?",
                params![ts_value(now_ns()), self.session_id],
            )
            .map_err(db_err("updating the capture session"))?;
        self.stats
            .rows
            .fetch_add(self.pending as u64, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .open_flows
            .store(self.open.len() as u64, Ordering::Relaxed);
        self.pending = 0;
        Ok(())
    }

    /// Serves one stage until its senders are gone; then commits and closes the session.
    pub fn run(self, rx: StageRx<WriterMsg>, cfg: &WriterConfig) -> Result<(), StoreError> {
        self.serve(&[rx], cfg)
    }

    /// Serves several stages, first to last in priority, until every sender is gone; then
    /// commits and closes the session. A message of an earlier stage is always taken before
    /// one of a later stage, so a burst on a later stage (log hits, which wait when their
    /// stage is full) never fills an earlier one (conntrack, which drops when full).
    pub fn serve(
        mut self,
        sources: &[StageRx<WriterMsg>],
        cfg: &WriterConfig,
    ) -> Result<(), StoreError> {
        let mut deadline = Instant::now() + cfg.commit_interval;
        let mut stall_debt = Duration::ZERO;
        // A message taken while grouping log batches, handled next.
        let mut held: Option<WriterMsg> = None;
        let mut live: Vec<usize> = (0..sources.len()).collect();
        loop {
            if !cfg.stall_per_message.is_zero() {
                stall_debt += cfg.stall_per_message;
                if stall_debt >= Duration::from_millis(1) {
                    std::thread::sleep(stall_debt);
                    stall_debt = Duration::ZERO;
                }
            }
            let next = match held.take() {
                Some(m) => Some((usize::MAX, m)),
                None => next_message(sources, &mut live),
            };
            match next {
                Some((from, WriterMsg::LogBatch(first))) => {
                    // Group commit: batches that queued up behind a commit share the next.
                    let mut batches = vec![first];
                    while from != usize::MAX && batches.len() < MAX_LOG_BATCHES_PER_COMMIT {
                        match sources[from].try_recv() {
                            Some(WriterMsg::LogBatch(b)) => batches.push(b),
                            Some(other) => {
                                held = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    self.log_batches(batches)?;
                }
                Some((_, WriterMsg::Sync(ack))) => {
                    self.commit()?;
                    let _ = ack.send(());
                }
                Some((_, msg)) => {
                    self.handle(msg)?;
                    if self.pending >= cfg.batch_rows {
                        self.commit()?;
                        deadline = Instant::now() + cfg.commit_interval;
                    }
                }
                None if live.is_empty() => break,
                None => {
                    // Nothing waiting: sleep until a stage has something, or the commit is due.
                    let mut sel = crossbeam_channel::Select::new();
                    for &i in &live {
                        sel.recv(sources[i].receiver());
                    }
                    let _ = sel.ready_timeout(deadline.saturating_duration_since(Instant::now()));
                }
            }
            if Instant::now() >= deadline {
                self.commit()?;
                deadline = Instant::now() + cfg.commit_interval;
            }
        }
        self.commit()?;
        self.conn
            .execute(
                "UPDATE capture_sessions SET stopped = ?, last_seen = ? WHERE id = ?",
                params![ts_value(now_ns()), ts_value(now_ns()), self.session_id],
            )
            .map_err(db_err("closing the capture session"))?;
        debug!("writer stopped");
        Ok(())
    }

    /// Writes everything committed into the data file and truncates the WAL.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("CHECKPOINT")
            .map_err(db_err("checkpointing the database"))
    }

    /// Appends a batch of messages and commits once: for benchmarks and tests.
    pub fn write_batch(
        &mut self,
        msgs: impl IntoIterator<Item = WriterMsg>,
    ) -> Result<(), StoreError> {
        for m in msgs {
            self.handle(m)?;
        }
        self.commit()
    }
}

/// A connection event for the bus: the flow's internal, public and destination endpoints.
fn flow_event(ev: &FlowEvent, seq: u64, ts_ns: u64) -> StoredEvent {
    let proto = proto_name(ev.proto);
    let (internal, public, dst) = (
        (ev.orig.src.to_ip(), ev.orig.sport),
        (ev.reply.dst.to_ip(), ev.reply.dport),
        (ev.orig.dst.to_ip(), ev.orig.dport),
    );
    let sock = |(ip, port): (std::net::IpAddr, u16)| std::net::SocketAddr::new(ip, port);
    StoredEvent {
        id: seq,
        ts_ns,
        source: "conntrack",
        severity: "info",
        message: format!(
            "{} {proto} flow {} -> {} as {}",
            ev.kind.name(),
            sock(internal),
            sock(dst),
            sock(public)
        ),
        metadata: serde_json::json!({
            "kind": ev.kind.name(),
            "proto": proto,
            "internal_ip": internal.0.to_string(),
            "internal_port": internal.1,
            "public_ip": public.0.to_string(),
            "public_port": public.1,
            "dst_ip": dst.0.to_string(),
            "dst_port": dst.1,
        }),
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| {
            warn!("could not read the hostname");
            String::new()
        })
}

/// The first message waiting on `sources`, in the order of `live` (their priority); stages
/// whose senders are all gone leave `live`.
fn next_message(
    sources: &[StageRx<WriterMsg>],
    live: &mut Vec<usize>,
) -> Option<(usize, WriterMsg)> {
    let mut k = 0;
    while k < live.len() {
        match sources[live[k]].poll() {
            Ok(m) => return Some((live[k], m)),
            Err(TryRecvError::Empty) => k += 1,
            Err(TryRecvError::Disconnected) => {
                live.remove(k);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer on a fresh database in a scratch folder named after `name`.
    fn test_writer(name: &str) -> (PathBuf, WriterConfig, Arc<WriterStats>, Writer) {
        let dir = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = WriterConfig {
            db_path: dir.join("t.duckdb"),
            ..WriterConfig::from_config(&crate::config::Config::default())
        };
        let stats = Arc::new(WriterStats::default());
        let w = Writer::open(&cfg, Arc::clone(&stats)).unwrap();
        (dir, cfg, stats, w)
    }

    #[test]
    fn event_log_rows_keep_their_json_metadata() {
        let (dir, _, stats, mut w) = test_writer("eventlog");
        let hit = |n: u64| {
            WriterMsg::Event(LogEvent {
                ts_ns: 1_700_000_000_000_000_000 + n,
                source: "logscan",
                severity: "error",
                message: format!("login failed {n}"),
                metadata: serde_json::json!({"rule_id": 3, "captures": {"user": "bob"}}),
            })
        };
        w.write_batch([hit(1), hit(2)]).unwrap();
        assert_eq!(stats.events.load(Ordering::Relaxed), 2);
        let (n, user, ids): (u64, String, String) = w
            .conn
            .query_row(
                "SELECT count(*)::UBIGINT, max(metadata->>'$.captures.user'), string_agg(id::VARCHAR, ',' ORDER BY id)
                 FROM event_log WHERE source = 'logscan'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((n, user.as_str(), ids.as_str()), (2, "bob", "1,2"));
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn queued_log_batches_share_a_commit_and_keep_order_and_last_cursors() {
        use crate::pipeline::stage::{Overflow, StageConfig, stage};
        let (dir, cfg, stats, w) = test_writer("groupcommit");
        let mut sub = w.bus().subscribe();
        let ev = |msg: &str| LogEvent {
            ts_ns: 1_700_000_000_000_000_000,
            source: "logscan",
            severity: "error",
            message: msg.to_string(),
            metadata: serde_json::json!({}),
        };
        let pos = |ts_ns: i64| Pos {
            ts_ns,
            rank: 1,
            digest: 7,
        };
        let batch = |c: &str, msgs: &[&str], at: i64| {
            WriterMsg::LogBatch(LogBatch {
                container_id: c.to_string(),
                hits: msgs.iter().map(|m| ev(m)).collect(),
                cursor: Some(pos(at)),
            })
        };
        let (tx, rx, _h) = stage(StageConfig::new("test->writer", 16, Overflow::Wait));
        // Queued before the writer runs: it takes a1, b1 together, holds the agent event it
        // met, then stores a2.
        tx.send_wait(batch("a", &["a1", "a1'"], 10)).unwrap();
        tx.send_wait(batch("b", &["b1"], 20)).unwrap();
        tx.send_wait(WriterMsg::Event(LogEvent {
            source: "agent",
            ..ev("agent")
        }))
        .unwrap();
        tx.send_wait(batch("a", &["a2"], 30)).unwrap();
        tx.send_wait(batch("a", &[], 40)).unwrap();
        drop(tx);
        let db = w.conn.try_clone().unwrap();
        w.run(rx, &cfg).unwrap();
        let mut seen = Vec::new();
        while let Ok(e) = sub.try_recv() {
            seen.push((e.id, e.message.clone()));
        }
        let msgs: Vec<&str> = seen.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(msgs, ["a1", "a1'", "b1", "agent", "a2"]);
        assert!(
            seen.windows(2).all(|p| p[0].0 < p[1].0),
            "ids in order: {seen:?}"
        );
        let cursors = cursors::load(&db).unwrap();
        assert_eq!(cursors["a"], pos(40));
        assert_eq!(cursors["b"], pos(20));
        let n: u64 = db
            .query_row("SELECT count(*)::UBIGINT FROM event_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 5);
        // {a1, b1} then, after the held agent event, {a2, a's cursor}.
        assert_eq!(stats.log_commits.load(Ordering::Relaxed), 2);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
