//! The one writer thread: owns the read-write connection, appends rows in order of receipt
//! and commits on a row-count or time bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use duckdb::Connection;
use tracing::{debug, info, warn};

use super::bus::{EventBus, StoredEvent};
use super::chunk_appender::ChunkAppender;
use super::columns::{self, FINAL, INEXACT, JOURNAL_COLUMNS, SLICE_COLUMNS, Slice, UNSEEN};
use super::cursors;
use super::database::{Database, OpenOptions};
use super::days;
use super::event_log::{self, Gap};
use super::gaps::{GapRecord, RecentGaps};
use super::open_flows;
use super::owners::{self, RecentOwners};
use super::processes::{self, ProcessRow};
use super::reconcile::{OpenFlow, OpenFlows, Verdict};
use super::schema::{StoreError, db_err};
use super::sessions;
use super::sockets;
use super::trail::{self, hour_of};
use crate::pipeline::clock::now_ns;
use crate::pipeline::flow::{EventKind, FlowEvent};
use crate::pipeline::messages::{LogBatch, WriterMsg};
use crate::pipeline::metrics::counters;
use crate::pipeline::ratelimit::RateLimitedLog;
use crate::pipeline::stage::{Overflow, StageRx};

counters! {
    /// Counters of the writer, readable from other threads.
    pub struct WriterStats as "writer" =>
    /// A reading of [`WriterStats`].
    WriterCounters {
        /// Rows appended (flow slices and journal rows) and committed.
        rows: Counter(Sent),
        /// Hourly partitions sorted into the sealed trail.
        partitions_sealed: Counter,
        /// Seals that failed and were rolled back (retried later; the hours stay readable).
        seal_failures: Counter,
        /// Slices moved into sealed hours.
        slices_sealed: Counter,
        /// Slices removed by retention (`[store] retain_days`).
        slices_expired: Counter,
        /// Oldest instant the trail holds, seconds since the epoch (0: empty).
        oldest_seconds: Gauge,
        /// Commits (appender flushes).
        commits: Counter,
        /// NEW or dump entries skipped because the flow was already open in the trail.
        duplicates: Counter(Skipped),
        /// Flows closed by reconciliation with an inexact end.
        reconciled: Counter,
        /// Flows open in the trail right now.
        open_flows: Gauge,
        /// Capture gaps recorded.
        gaps: Counter,
        /// Event-log rows written.
        events: Counter(Sent),
        /// Transactions that stored log hits and cursors (several batches share one under load).
        log_commits: Counter,
    }
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
    /// DuckDB's worker threads.
    pub threads: u32,
    /// Days of flows kept (0: all).
    pub retain_days: u32,
}

impl WriterConfig {
    /// How the writer opens its database: read-write, with DuckDB's limit and threads.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            read_only: false,
            memory_limit_mb: Some(self.memory_limit_mb),
            threads: Some(self.threads),
            builtin_only: false,
        }
    }

    /// The writer settings of an agent configuration.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        WriterConfig {
            db_path: cfg.db_path.clone(),
            batch_rows: cfg.store.batch_rows,
            commit_interval: Duration::from_millis(cfg.store.commit_interval_ms),
            memory_limit_mb: cfg.store.memory_limit_mb,
            threads: cfg.store.threads,
            retain_days: cfg.store.retain_days,
        }
    }
}

/// How often the open flows are checkpointed: a start replays at most this much of the trail.
const OPEN_FLOWS_CHECKPOINT: Duration = Duration::from_secs(60);
/// How often an idle writer records that its capture session is still running.
const SESSION_TOUCH: Duration = Duration::from_secs(10);
/// Once woken by a conntrack event, the writer waits this long for more before serving them,
/// so a steady trickle is written in batches (one wakeup per batch, not per event): two of
/// the reader's batches. At 200k events/s that is 10,000 queued, under a quarter of the
/// stage; rows are committed once a second anyway.
const COALESCE: Duration = Duration::from_millis(50);

/// An hour is sealed this long after it ended (by the events' clock): DESTROYs of its flows
/// that queue meanwhile still land in it unsorted, later ones are sealed with the next hour.
const SEAL_GRACE_MS: i64 = 120_000;

/// After a failed seal, the next attempt waits this long (a warning each time).
const SEAL_RETRY: Duration = Duration::from_secs(60);

/// Log batches stored in one transaction at most.
const MAX_LOG_BATCHES_PER_COMMIT: usize = 256;

/// The writer's state, separated from the thread so tests and benchmarks can drive it.
pub struct Writer {
    // Field order is drop order: the appenders and connection go before the database.
    slices: ChunkAppender,
    journal: ChunkAppender,
    /// Process rows, staged until the commit moves them.
    procs: ChunkAppender,
    conn: Connection,
    db: Arc<Database>,
    next_seq: u64,
    flows: OpenFlows,
    pending: usize,
    /// Commit once this many rows are pending (`WriterConfig::batch_rows`).
    batch_rows: usize,
    session_id: u64,
    stats: Arc<WriterStats>,
    recent_gaps: Arc<RecentGaps>,
    bus: EventBus,
    // Connection events of the open commit, published once it is committed.
    // With the flow's tuples (original, after source NAT), to name its owner at publishing.
    unpublished: Vec<(StoredEvent, Option<(owners::Tuple, owners::Tuple)>)>,
    // Connection events of the last commit, published at the next: a host process's socket
    // record leaves the kernel after the conntrack event of the same packet, on another
    // stage, and one commit interval lets it arrive so the event can name its owner.
    held: Vec<(StoredEvent, Option<(owners::Tuple, owners::Tuple)>)>,
    /// Recent socket owners, kept while a trigger wants connection events.
    owners: RecentOwners,
    /// Rows in `procs` since the last move.
    staged: usize,
    /// Socket rows (`socket_events`).
    sockets: ChunkAppender,
    touched_at: Instant,
    checkpointed_at: Instant,
    // The events' clock (ms): the newest event time seen; hours end by it, not by the wall
    // clock, so a replayed or generated trail is partitioned as a live one.
    clock_ms: i64,
    swept_hour: Option<i32>,
    sealed_hour: Option<i32>,
    // The oldest sealed hour that lacks slices the sorted trail will only get at the next seal
    // (late ones in trail_recent, interim ones of a flow opened after their sweep), as
    // recorded in trail_state, and an older one since, recorded at the next commit before
    // the rows are flushed (so that a reader never misses one).
    late_hour: Option<i32>,
    late_due: Option<i32>,
    // The oldest hour a flow opened since the last sweep has no interim slice in.
    unswept: Option<i32>,
    retained_hour: Option<i32>,
    retain_days: u32,
    // Retention held back by the days that hold slices: said once a day, not at every seal.
    retention_held: RateLimitedLog,
    // After a failed seal: no attempt before this instant.
    seal_retry_at: Option<Instant>,
    // The events' clock at the last checkpoint: a replayed or generated trail is checkpointed
    // as often, in its own time, as a live one.
    checkpointed_clock_ms: i64,
}

impl Writer {
    /// Opens (and migrates) the database, loads the open flows and starts a capture session.
    pub fn open(cfg: &WriterConfig, stats: Arc<WriterStats>) -> Result<Self, StoreError> {
        super::database::fix_mmap_threshold();
        let db = Database::open(&cfg.db_path, cfg.open_options())?;
        let conn = db.connect()?;
        let slices = db.appender("trail_recent")?;
        slices.expect_types(&SLICE_COLUMNS)?;
        let journal = db.appender("open_journal")?;
        journal.expect_types(&JOURNAL_COLUMNS)?;
        // Rows a crash left staged move first.
        processes::move_staged(&conn)?;
        let procs = db.appender(processes::STAGING)?;
        let sockets = db.appender(sockets::TABLE)?;
        let next_seq: u64 = conn
            .query_row(
                "SELECT greatest(
                    (SELECT coalesce(max(seq) + 1, 0) FROM trail_recent),
                    (SELECT coalesce(max(seq) + 1, 0) FROM open_journal),
                    (SELECT coalesce(max(next_seq), 0) FROM open_flows_checkpoint))::UBIGINT",
                [],
                |r| r.get(0),
            )
            .map_err(db_err("reading the last sequence number"))?;
        let state = trail::state(&conn)?;
        let session_id = sessions::start(&conn, now_ns())?;
        if let Some(last_commit_ns) = sessions::unclean_end_ns(&conn, session_id) {
            // What the previous run received after its last commit is gone; flows still
            // alive come back with the start-up dump, the others are this gap.
            event_log::record_gap(
                &conn,
                &Gap {
                    session_id,
                    source: "restart",
                    start_ns: last_commit_ns,
                    end_ns: now_ns(),
                    lost: None,
                    reason: "the previous run ended without a clean stop (killed or crashed): \
                             what it received after its last commit was not stored",
                },
            )?;
            stats.gaps.fetch_add(1, Ordering::Relaxed);
            warn!("the previous run ended without a clean stop: gap recorded from its last commit");
        }
        let mut w = Writer {
            slices,
            journal,
            conn,
            db: Arc::new(db),
            next_seq,
            flows: OpenFlows::default(),
            pending: 0,
            batch_rows: cfg.batch_rows.max(1),
            session_id,
            stats,
            recent_gaps: Arc::default(),
            bus: EventBus::default(),
            unpublished: Vec::new(),
            held: Vec::new(),
            owners: RecentOwners::default(),
            procs,
            staged: 0,
            sockets,
            touched_at: Instant::now(),
            checkpointed_at: Instant::now(),
            clock_ms: i64::MIN,
            swept_hour: None,
            sealed_hour: state.sealed_hour,
            late_hour: state.late_hour,
            late_due: None,
            unswept: None,
            retained_hour: state.retained_from_ms.map(hour_of),
            retain_days: cfg.retain_days,
            retention_held: RateLimitedLog::new(Duration::from_secs(86_400)),
            seal_retry_at: None,
            checkpointed_clock_ms: i64::MIN,
        };
        w.load_open_flows()?;
        w.refresh_oldest()?;
        let day_ago = (now_ns() / 1_000) as i64 - 86_400_000_000;
        for g in super::gaps::since(&w.conn, day_ago)? {
            w.recent_gaps.push(g);
        }
        Ok(w)
    }

    /// The bus the writer publishes committed events on.
    pub fn bus(&self) -> EventBus {
        self.bus.clone()
    }

    /// Gaps of the last day (loaded at open) and those recorded since.
    pub fn recent_gaps(&self) -> Arc<RecentGaps> {
        Arc::clone(&self.recent_gaps)
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
        sessions::previous_end_ns(&self.conn, self.session_id)
    }

    fn load_open_flows(&mut self) -> Result<(), StoreError> {
        open_flows::recover(&self.conn, &mut self.flows)?;
        self.stats
            .open_flows
            .store(self.flows.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn refresh_oldest(&self) -> Result<(), StoreError> {
        let oldest = trail::oldest_ms(&self.conn)?.unwrap_or(0);
        self.stats
            .oldest_seconds
            .store(oldest.max(0) as u64 / 1_000, Ordering::Relaxed);
        Ok(())
    }

    /// Saves the open set (no row is pending: called after a commit or at open).
    fn checkpoint_open_flows(&mut self) -> Result<(), StoreError> {
        open_flows::checkpoint(&self.db, &self.conn, &self.flows, self.next_seq)?;
        super::database::release_freed_memory();
        self.checkpointed_at = Instant::now();
        self.checkpointed_clock_ms = self.clock_ms;
        Ok(())
    }

    /// Handles one message, appending rows through `app`. Returns the rows appended.
    fn handle(&mut self, msg: WriterMsg) -> Result<usize, StoreError> {
        match msg {
            WriterMsg::Flow { ev, received_ns } => self.flow(ev, received_ns),
            WriterMsg::Exec(ev) => {
                self.owners.exec(ev.pid, &ev.filename);
                self.process(ProcessRow::Exec(ev))
            }
            WriterMsg::Life(ev) => {
                if ev.kind == crate::pipeline::process::LifeKind::Exit {
                    self.owners.exit(ev.pid);
                }
                self.process(ProcessRow::Life(ev))
            }
            WriterMsg::Socket(ev) => {
                if self.bus.flows_wanted() {
                    self.owners.socket(&ev);
                }
                sockets::append(&mut self.sockets, &ev)?;
                self.pending += 1;
                Ok(1)
            }
            WriterMsg::SocketsAttached { at_ns } => {
                sockets::record_coverage(&self.conn, self.session_id, at_ns)?;
                Ok(0)
            }
            WriterMsg::Container(c) => {
                self.owners.container(&c);
                sockets::record_container(&self.conn, &c)?;
                Ok(0)
            }
            WriterMsg::DumpBegin => {
                self.flows.dump_begin();
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
                let db = Arc::clone(&self.db);
                let _change = db.changes().begin();
                let stored = event_log::record_gap(
                    &self.conn,
                    &Gap {
                        session_id: self.session_id,
                        source,
                        start_ns,
                        end_ns,
                        lost,
                        reason,
                    },
                )?;
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.recent_gaps.push(GapRecord::new(
                    source,
                    (start_ns / 1_000) as i64,
                    (end_ns.max(start_ns) / 1_000) as i64,
                    lost,
                    reason,
                ));
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
                let stored = event_log::insert(&self.conn, e)?;
                self.stats.events.fetch_add(1, Ordering::Relaxed);
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
        let stored = event_log::store_batches(&self.conn, batches)?;
        self.stats.log_commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .events
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        let n = stored.len();
        for ev in stored {
            self.bus.publish(ev);
        }
        Ok(n)
    }

    fn flow(&mut self, ev: FlowEvent, received_ns: u64) -> Result<usize, StoreError> {
        let (ts, _) = ev.event_time(received_ns);
        self.advance(trail::end_ms(ts))?;
        let seq = match self.flows.on_event(&ev, received_ns) {
            Verdict::Ignore => return Ok(0),
            Verdict::Duplicate => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
            Verdict::Open(key, open) => {
                // Opened after the sweep of hours it outlived: it has no interim slice in
                // them until the next sweep writes them.
                if open.start_ns.is_some() && self.swept_hour.is_some_and(|s| open.covered < s) {
                    let first = open.covered + 1;
                    self.note_hour(first);
                    self.unswept = Some(self.unswept.map_or(first, |u| u.min(first)));
                }
                let row = open_flows::open_row(&key, &open);
                let seq = self.next_seq();
                columns::append_journal(&mut self.journal, &row, seq)?;
                seq
            }
            Verdict::Close(open) => self.close(&ev, open, ts, None, 0)?,
        };
        if ev.kind != EventKind::Dump && self.bus.flows_wanted() {
            let tuples = (
                owners::tuple(
                    ev.proto,
                    ev.orig.src.to_ip(),
                    ev.orig.sport,
                    ev.orig.dst.to_ip(),
                    ev.orig.dport,
                ),
                owners::tuple(
                    ev.proto,
                    ev.reply.dst.to_ip(),
                    ev.reply.dport,
                    ev.orig.dst.to_ip(),
                    ev.orig.dport,
                ),
            );
            self.unpublished
                .push((event_log::connection_event(&ev, seq, ts), Some(tuples)));
        }
        Ok(1)
    }

    /// Stages a process row; the commit moves the staged rows into `process_events`.
    fn process(&mut self, row: ProcessRow) -> Result<usize, StoreError> {
        processes::append(&mut self.procs, &row)?;
        self.staged += 1;
        self.pending += 1;
        Ok(1)
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending += 1;
        seq
    }

    /// Writes the slices of an ended flow: an interim one for each earlier hour no sweep
    /// covered (it opened after the sweep, or before the trail saw it), then the final one.
    /// Returns the final slice's sequence number.
    fn close(
        &mut self,
        ev: &FlowEvent,
        open: Option<OpenFlow>,
        end_ns: u64,
        end_lo_ns: Option<u64>,
        flags: u8,
    ) -> Result<u64, StoreError> {
        let start = open
            .and_then(|o| o.start_ns)
            .or(ev.start_ns)
            .map(trail::start_ms);
        let end = trail::end_ms(end_ns);
        let end_hour = hour_of(end);
        let mut slice = Slice::interim(
            end_hour,
            ev.proto,
            ev.zone,
            ev.ct_id,
            &ev.orig,
            &ev.reply,
            start,
            open.is_some_and(|o| o.by_dump),
        );
        if open.is_none() {
            slice.flags |= UNSEEN;
        }
        if let Some(s) = start {
            let first = hour_of(s)
                .max(open.map_or(i32::MIN, |o| o.covered.saturating_add(1)))
                .max(end_hour.saturating_sub(trail::BACKFILL_HOURS));
            for h in first..end_hour {
                slice.hour = h;
                self.note_hour(h);
                slice.seq = self.next_seq();
                columns::append_slice(&mut self.slices, &slice)?;
            }
        }
        slice.hour = end_hour;
        self.note_hour(end_hour);
        slice.flags |= FINAL | flags;
        slice.end_ms = Some(end);
        slice.end_lo_ms = end_lo_ns.map(trail::start_ms);
        slice.out = ev.counters_orig;
        slice.back = ev.counters_reply;
        slice.seq = self.next_seq();
        columns::append_slice(&mut self.slices, &slice)?;
        Ok(slice.seq)
    }

    /// Moves the events' clock to `ms`; when an hour has ended by it, every flow open across
    /// that hour's end gets an interim slice in it.
    fn advance(&mut self, ms: i64) -> Result<(), StoreError> {
        if ms <= self.clock_ms {
            return Ok(());
        }
        self.clock_ms = ms;
        let ended = hour_of(ms) - 1;
        if self.swept_hour.is_some_and(|h| h >= ended) {
            return Ok(());
        }
        // Appended as the sweep goes: a list of millions of interim slices first would cost
        // more memory than the open flows themselves.
        let (slices, next_seq, pending) = (&mut self.slices, &mut self.next_seq, &mut self.pending);
        let mut failed = None;
        let mut oldest = None::<i32>;
        self.flows.sweep(ended, |k, v, h| {
            oldest = Some(oldest.map_or(h, |o| o.min(h)));
            let mut slice = Slice::interim(
                h,
                k.proto,
                k.zone,
                k.ct_id,
                &k.orig,
                &v.reply,
                v.start_ns.map(trail::start_ms),
                v.by_dump,
            );
            slice.seq = *next_seq;
            *next_seq += 1;
            *pending += 1;
            if failed.is_none()
                && let Err(e) = columns::append_slice(slices, &slice)
            {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(h) = oldest {
            self.note_hour(h);
        }
        self.unswept = None;
        self.swept_hour = Some(ended);
        Ok(())
    }

    /// A slice of `hour` was appended, or a flow lacks one there: a sealed hour must be marked.
    fn note_hour(&mut self, hour: i32) {
        if self.sealed_hour.is_some_and(|s| hour <= s)
            && self.late_hour.is_none_or(|l| hour < l)
            && self.late_due.is_none_or(|d| hour < d)
        {
            self.late_due = Some(hour);
        }
    }

    fn dump_end(&mut self, at_ns: u64, alive_until_ns: Option<u64>) -> Result<usize, StoreError> {
        let closed = self.flows.dump_end(at_ns, alive_until_ns);
        for c in &closed {
            self.close(&c.ev, Some(c.flow), at_ns, c.end_lo_ns, INEXACT)?;
        }
        if !closed.is_empty() {
            info!(
                closed = closed.len(),
                "flows in the trail were gone from the conntrack table; closed with inexact end"
            );
            self.stats
                .reconciled
                .fetch_add(closed.len() as u64, Ordering::Relaxed);
        }
        Ok(closed.len())
    }

    /// Sorts the hours that ended more than `SEAL_GRACE_MS` ago into the sealed trail (after
    /// a checkpoint, so recovery needs none of their sequence numbers), then applies
    /// retention. Called after a commit.
    fn seal_and_retain(&mut self) -> Result<(), StoreError> {
        if self.clock_ms == i64::MIN {
            return Ok(());
        }
        let upto = hour_of(self.clock_ms - SEAL_GRACE_MS) - 1;
        if self.sealed_hour.is_some_and(|h| h >= upto)
            || self.swept_hour.is_none_or(|h| h < upto)
            || self.seal_retry_at.is_some_and(|t| Instant::now() < t)
        {
            return Ok(());
        }
        self.checkpoint_open_flows()?;
        let t0 = Instant::now();
        match trail::seal(&self.conn, upto) {
            Ok(moved) => self.sealed(upto, moved, t0)?,
            // Rolled back, the hours stay in trail_recent, where lookups read them: a seal
            // that fails (DuckDB out of memory on a huge hour, say) must stop neither the
            // capture nor retention, nor turn, through restarts, into capture gaps.
            Err(e) => {
                self.stats.seal_failures.fetch_add(1, Ordering::Relaxed);
                self.seal_retry_at = Some(Instant::now() + SEAL_RETRY);
                super::database::release_freed_memory();
                warn!(
                    hour = upto,
                    error = %e,
                    retry_in_s = SEAL_RETRY.as_secs(),
                    "sealing failed and was rolled back: the hours stay unsorted until it succeeds"
                );
            }
        }
        if self.retain_days > 0 {
            let by_clock = hour_of(self.clock_ms) - (self.retain_days as i32).saturating_mul(24);
            if self.retained_hour.is_none_or(|h| h < by_clock) {
                // The clock is the kernel's timestamps: one stamped years ahead (a system clock
                // wrong for a moment) would put the horizon past every real day. The newest
                // `retain_days` days that hold slices are kept whatever it says; after a long
                // stop, the old days then go one per new day rather than all at once.
                let Some(floor) =
                    days::oldest_of_newest_holding(&self.conn, self.retain_days as usize)?
                else {
                    return self.refresh_oldest();
                };
                let from = by_clock.min(floor * 24);
                if from < by_clock && self.retention_held.allow().is_some() {
                    warn!(
                        horizon_hour = by_clock,
                        kept_from_hour = from,
                        "retention keeps days before its horizon: fewer than retain_days days \
                         after it hold slices (a clock set ahead, or a long stop)"
                    );
                }
                if self.retained_hour.is_some_and(|h| h >= from) {
                    return self.refresh_oldest();
                }
                let removed = trail::retain(&self.conn, from)?;
                self.retained_hour = Some(from);
                self.stats
                    .slices_expired
                    .fetch_add(removed as u64, Ordering::Relaxed);
                if removed > 0 {
                    info!(
                        from_hour = from,
                        slices = removed,
                        "retention removed old hours"
                    );
                }
            }
        }
        self.refresh_oldest()
    }

    /// Records a seal of the hours up to `upto` that moved `moved` slices.
    fn sealed(&mut self, upto: i32, moved: usize, t0: Instant) -> Result<(), StoreError> {
        self.seal_retry_at = None;
        // The late slices are sorted in now; flows opened since the sweep still lack some.
        let still = self.unswept.filter(|h| *h <= upto);
        if self.late_hour != still {
            trail::set_late(&self.conn, still)?;
            self.late_hour = still;
        }
        super::database::release_freed_memory();
        self.sealed_hour = Some(upto);
        self.stats.partitions_sealed.fetch_add(1, Ordering::Relaxed);
        self.stats
            .slices_sealed
            .fetch_add(moved as u64, Ordering::Relaxed);
        debug!(
            hour = upto,
            slices = moved,
            ms = t0.elapsed().as_millis() as u64,
            "hour sealed"
        );
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        // Sessions, late hours, seals and retention change here: readers keeping the
        // coverage read it again.
        let db = Arc::clone(&self.db);
        let _change = db.changes().begin();
        // An idle trail costs no write transaction a second: the session's last sign of life
        // is refreshed every SESSION_TOUCH only (after a crash it bounds the session's end
        // from below, and an older bound is still a true one).
        let touch_due = self.touched_at.elapsed() >= SESSION_TOUCH;
        if self.pending == 0 && self.unpublished.is_empty() && self.held.is_empty() && !touch_due {
            return Ok(());
        }
        if let Some(h) = self.late_due {
            trail::note_late(&self.conn, h)?;
            self.late_hour = Some(h);
            self.late_due = None;
        }
        self.slices.flush()?;
        self.journal.flush()?;
        self.sockets.flush()?;
        if self.staged > 0 {
            self.procs.flush()?;
            processes::move_staged(&self.conn)?;
            self.staged = 0;
        }
        self.publish_held();
        self.held = std::mem::take(&mut self.unpublished);
        sessions::touch(&self.conn, self.session_id, now_ns())?;
        self.touched_at = Instant::now();
        if self.checkpointed_at.elapsed() >= OPEN_FLOWS_CHECKPOINT
            || self.clock_ms.saturating_sub(self.checkpointed_clock_ms)
                >= OPEN_FLOWS_CHECKPOINT.as_millis() as i64
        {
            self.checkpoint_open_flows()?;
        }
        self.seal_and_retain()?;
        self.stats
            .rows
            .fetch_add(self.pending as u64, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .open_flows
            .store(self.flows.len() as u64, Ordering::Relaxed);
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
        // A message taken while grouping log batches, handled next.
        let mut held: Option<WriterMsg> = None;
        let mut live: Vec<usize> = (0..sources.len()).collect();
        loop {
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
                    if self.write(msg)? {
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
                    let woke = sel
                        .ready_timeout(deadline.saturating_duration_since(Instant::now()))
                        .ok()
                        .map(|k| live[k]);
                    if let Some(first) = woke {
                        self.coalesce(sources, &live, first, deadline);
                    }
                }
            }
            if Instant::now() >= deadline {
                self.commit()?;
                deadline = Instant::now() + cfg.commit_interval;
            }
        }
        self.finish()
    }

    /// Publishes the connection events held since the last commit, each with its owner as
    /// far as the recent socket records name it.
    fn publish_held(&mut self) {
        self.owners.expire(now_ns());
        for (mut ev, tuples) in self.held.drain(..) {
            if let Some((original, translated)) = tuples
                && let Some(meta) = ev.metadata.as_object_mut()
            {
                meta.insert("owner".into(), self.owners.describe(original, translated));
            }
            self.bus.publish(ev);
        }
    }

    /// A clean stop: commits, checkpoints the open flows (so a start replays nothing) and
    /// closes the capture session.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.commit()?;
        self.publish_held();
        // After the commit, which marks its own change: a nested mark would make the count
        // even while the session is being closed.
        let db = Arc::clone(&self.db);
        let _change = db.changes().begin();
        self.checkpoint_open_flows()?;
        sessions::stop(&self.conn, self.session_id, now_ns())?;
        debug!("writer stopped");
        Ok(())
    }

    /// Woken by stage `first`: when that is an event source (a stage that drops rather than
    /// waits, conntrack), waits up to `COALESCE` for more of its events, so a steady trickle
    /// is served in batches. Any message on a waiting stage (log hits, agent events: someone
    /// may be waiting for their webhook) ends the wait at once, and so does a stage a quarter
    /// full.
    fn coalesce(
        &self,
        sources: &[StageRx<WriterMsg>],
        live: &[usize],
        first: usize,
        deadline: Instant,
    ) {
        let filling = sources
            .iter()
            .any(|s| s.receiver().len() * 4 >= s.receiver().capacity().unwrap_or(0));
        if filling || sources[first].overflow() != Overflow::DropNewest {
            return;
        }
        let wait = COALESCE.min(deadline.saturating_duration_since(Instant::now()));
        let mut others = crossbeam_channel::Select::new();
        let mut any = false;
        for &i in live {
            if sources[i].overflow() == Overflow::Wait {
                others.recv(sources[i].receiver());
                any = true;
            }
        }
        if any {
            let _ = others.ready_timeout(wait);
        } else {
            std::thread::sleep(wait);
        }
    }

    /// Writes everything committed into the data file and truncates the WAL.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("CHECKPOINT")
            .map_err(db_err("checkpointing the database"))
    }

    /// Handles one message and commits once `batch_rows` rows are pending, as the writer's
    /// thread does; returns whether it committed.
    pub fn write(&mut self, msg: WriterMsg) -> Result<bool, StoreError> {
        self.handle(msg)?;
        if self.pending < self.batch_rows {
            return Ok(false);
        }
        self.commit()?;
        Ok(true)
    }

    /// Commits what is pending: for benchmarks and tests.
    pub fn commit_pending(&mut self) -> Result<(), StoreError> {
        self.commit()
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
    use crate::pipeline::messages::{LogEvent, Pos};

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
            metadata: serde_json::json!({ "m": msg }),
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
        // The table holds what the bus published, under the same ids, metadata as JSON.
        let rows: String = db
            .query_row(
                "SELECT string_agg(id || ' ' || message || ' ' || (metadata->>'$.m'), ',' ORDER BY id)
                 FROM event_log",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let published: Vec<String> = seen.iter().map(|(id, m)| format!("{id} {m} {m}")).collect();
        assert_eq!(rows, published.join(","));
        // {a1, b1} then, after the held agent event, {a2, a's cursor}.
        assert_eq!(stats.log_commits.load(Ordering::Relaxed), 2);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A flow of the open-flow tests: client port `sport`, kernel id `id`, started at a
    /// fixed instant.
    fn flow(kind: EventKind, id: u32, sport: u16) -> WriterMsg {
        let mut ev = crate::store::reconcile::test_flow(kind, id, sport);
        ev.start_ns = Some(1_700_000_000_000_000_000 + u64::from(id));
        WriterMsg::Flow {
            ev,
            received_ns: 1_700_000_000_000_000_000,
        }
    }

    /// Flow `id` (client port 1000 + `id`), started at `start_ns`, an event of it at `t_ns`.
    fn flow_at(kind: EventKind, id: u32, start_ns: u64, t_ns: u64) -> WriterMsg {
        let mut ev = crate::store::reconcile::test_flow(kind, id, 1000 + id as u16);
        ev.start_ns = Some(start_ns);
        ev.event_ns = Some(t_ns);
        WriterMsg::Flow {
            ev,
            received_ns: t_ns,
        }
    }

    fn open_ids(w: &Writer) -> Vec<u32> {
        let mut ids: Vec<u32> = w.flows.iter().map(|(k, _)| k.ct_id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_start_recovers_open_flows_from_the_checkpoint_and_the_rows_since() {
        use EventKind::{Destroy, New};
        let (dir, cfg, _, mut w) = test_writer("checkpoint");
        w.write_batch([flow(New, 1, 1001), flow(New, 2, 1002), flow(New, 3, 1003)])
            .unwrap();
        w.checkpoint_open_flows().unwrap();
        // After the checkpoint, then a crash (no clean stop, no new checkpoint): flow 1 ends,
        // flow 4 begins.
        w.write_batch([flow(Destroy, 1, 1001), flow(New, 4, 1004)])
            .unwrap();
        drop(w);
        let stats = Arc::new(WriterStats::default());
        let w = Writer::open(&cfg, Arc::clone(&stats)).unwrap();
        assert_eq!(open_ids(&w), [2, 3, 4]);
        assert_eq!(stats.open_flows.load(Ordering::Relaxed), 3);
        let r = open_flows::recover(&w.conn, &mut OpenFlows::default()).unwrap();
        assert_eq!(
            (r.checkpoint, r.loaded, r.replayed),
            (Some(3), 3, 2),
            "three flows in the checkpoint, two rows since"
        );
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_recovery_read_in_pages_finds_the_same_open_flows() {
        use EventKind::{Destroy, New};
        let (dir, _, _, mut w) = test_writer("recoverpages");
        // Two checkpoints, so that the second one's rows do not start at rowid 0.
        w.write_batch((1..=4).map(|i| flow(New, i, 1000 + i as u16)))
            .unwrap();
        w.checkpoint_open_flows().unwrap();
        w.write_batch([flow(Destroy, 2, 1002), flow(New, 5, 1005)])
            .unwrap();
        w.checkpoint_open_flows().unwrap();
        // Since the checkpoint: opened, ended, opened again under a new id, and ended.
        w.write_batch([
            flow(New, 6, 1006),
            flow(Destroy, 1, 1001),
            flow(New, 7, 1007),
            flow(Destroy, 6, 1006),
            flow(New, 8, 1008),
        ])
        .unwrap();
        let ids = |f: &OpenFlows| {
            let mut v: Vec<u32> = f.iter().map(|(k, _)| k.ct_id).collect();
            v.sort_unstable();
            v
        };
        for page in [1, 2, 3, 100_000] {
            let mut flows = OpenFlows::default();
            let r = open_flows::recover_in_pages(&w.conn, &mut flows, page).unwrap();
            assert_eq!(
                (ids(&flows), r.loaded, r.replayed),
                (vec![3, 4, 5, 7, 8], 4, 5),
                "pages of {page} rows"
            );
        }
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restart_writes_no_interim_slice_twice() {
        const HOUR: u64 = 3_600_000_000_000;
        let (dir, cfg, _, mut w) = test_writer("covered");
        let t0 = 1_700_000_000_000_000_000u64;
        let new = |id: u32, t_ns: u64| flow_at(EventKind::New, id, t_ns, t_ns);
        // Flows 1 and 2 open in hour H; flow 3's NEW two hours on sweeps H and H + 1.
        w.write_batch([new(1, t0), new(2, t0), new(3, t0 + 2 * HOUR)])
            .unwrap();
        w.finish().unwrap();
        // Restarted, flow 4's NEW an hour on sweeps H + 2: one slice for each of 1, 2 and 3.
        let mut w = Writer::open(&cfg, Arc::new(WriterStats::default())).unwrap();
        w.write_batch([new(4, t0 + 3 * HOUR)]).unwrap();
        let db = w.conn.try_clone().unwrap();
        w.finish().unwrap();
        let (slices, distinct): (u64, u64) = db
            .query_row(
                "SELECT count(*)::UBIGINT, count(DISTINCT (hour, src_port))::UBIGINT FROM (
                     SELECT hour, src_port FROM trail_recent WHERE flags & 1 = 0
                     UNION ALL SELECT hour, src_port FROM flow_sealed WHERE flags & 1 = 0)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (slices, distinct),
            (7, 7),
            "flows 1, 2: H..=H+2; flow 3: H+2"
        );
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_seal_is_rolled_back_and_retried_while_capture_goes_on() {
        use EventKind::{Destroy, New};
        const SEC: u64 = 1_000_000_000;
        let (dir, _, stats, mut w) = test_writer("sealfail");
        // 800 s into hour H.
        let t0 = 1_700_000_000_000_000_000u64;
        let at = flow_at;
        let count = |conn: &Connection, table: &str| -> u64 {
            conn.query_row(&format!("SELECT count(*)::UBIGINT FROM {table}"), [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let other = w.conn.try_clone().unwrap();
        // The seal of hour H fails: a view holds the name of its day's dictionary table.
        let dst = crate::store::days::dst_table(
            crate::store::days::Layout::Daily,
            crate::store::days::day_of(hour_of(trail::start_ms(t0))),
        );
        other
            .execute_batch(&format!("CREATE VIEW {dst} AS SELECT 1 AS x"))
            .unwrap();
        let late = t0 + 3_900 * SEC;
        w.write_batch([
            at(New, 1, t0, t0),
            at(Destroy, 1, t0, t0 + 10 * SEC),
            at(New, 2, late, late),
        ])
        .unwrap();
        let unsealed = count(&other, "trail_recent");
        assert_eq!(unsealed, 1, "flow 1's final slice");
        assert_eq!(
            (
                stats.seal_failures.load(Ordering::Relaxed),
                stats.partitions_sealed.load(Ordering::Relaxed),
                count(&other, "flow_sealed"),
            ),
            (1, 0, 0)
        );
        // Capture goes on, and no new attempt before the retry is due.
        w.write_batch([at(New, 3, late, late + SEC)]).unwrap();
        assert_eq!(stats.seal_failures.load(Ordering::Relaxed), 1);
        assert_eq!(open_ids(&w), [2, 3]);
        // The name is free again and the retry is due: the hour is sealed whole.
        other.execute_batch(&format!("DROP VIEW {dst}")).unwrap();
        w.seal_retry_at = None;
        w.write_batch([at(New, 4, late, late + 2 * SEC)]).unwrap();
        assert_eq!(
            (
                stats.seal_failures.load(Ordering::Relaxed),
                stats.partitions_sealed.load(Ordering::Relaxed),
                count(&other, "flow_sealed"),
                count(&other, "trail_recent"),
            ),
            (1, 1, unsealed, 0)
        );
        drop((w, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `who` for 203.0.113.1:`port` at `at`, no tolerance, as a live trail.
    fn who_at(
        conn: &Connection,
        port: u16,
        at: chrono::DateTime<chrono::Utc>,
    ) -> crate::query::who::WhoAnswer {
        crate::query::who::who(
            conn,
            &crate::query::who::WhoQuery {
                ip: "203.0.113.1".parse().unwrap(),
                port,
                at,
                tolerance: Duration::ZERO,
                proto: None,
                dst_ip: None,
                dst_port: None,
                live: true,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_version_7_trail_migrates_into_hourly_slices_and_open_flows() {
        use crate::query::who::WhoStatus;
        let dir = std::env::temp_dir().join(format!("nattrail-v7-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        {
            // A schema-7 trail as the previous release wrote it: flow 1 from t0 to t0 + 2 h
            // (three hours), flow 2 still open, flow 3 a DESTROY whose start it never saw.
            let c = crate::store::schema::database_at_version(&path, 7);
            let (client, server, public) = (
                281470849515522u128,
                281474007000066u128,
                281474087547137u128,
            );
            let row = |seq: u64, kind: u8, id: u32, port: u16, ts_s: i64, stop: bool| {
                format!(
                    "({seq}, make_timestamp({ts}), 0, {kind}, 4, 6, 0, {id}, 0, 384,
                      {client}, {server}, {port}, 443, {server}, {public}, 443, {p2},
                      make_timestamp({start}), {stop_ts}, NULL, false,
                      {c}, {c}, {c}, {c}, NULL, NULL, NULL)",
                    ts = ts_s * 1_000_000,
                    p2 = port + 10_000,
                    start = if kind == 2 && id == 3 {
                        "NULL".to_string()
                    } else {
                        "1700000000000000".to_string()
                    },
                    stop_ts = if stop {
                        format!("make_timestamp({})", ts_s * 1_000_000)
                    } else {
                        "NULL".into()
                    },
                    c = if kind == 2 {
                        "7".to_string()
                    } else {
                        "NULL".to_string()
                    },
                )
            };
            let rows = [
                row(0, 1, 1, 1001, 1_700_000_000, false),
                row(1, 1, 2, 1002, 1_700_000_000, false),
                row(2, 2, 1, 1001, 1_700_007_200, true),
                row(3, 2, 3, 1003, 1_700_000_500, true),
            ];
            c.execute_batch(&format!(
                "INSERT INTO conntrack_events VALUES {};
                 INSERT INTO capture_sessions VALUES (1, make_timestamp(1699990000000000),
                     make_timestamp(1700010000000000), make_timestamp(1700010000000000), 'gw', 'old');",
                rows.join(", ")
            ))
            .unwrap();
        }
        let cfg = WriterConfig {
            db_path: path.clone(),
            ..WriterConfig::from_config(&crate::config::Config::default())
        };
        let w = Writer::open(&cfg, Arc::new(WriterStats::default())).unwrap();
        assert_eq!(open_ids(&w), [2]);
        let slices: Vec<(i32, u8, u16)> = w
            .conn
            .prepare("SELECT hour, flags, src_port FROM flow_trail ORDER BY src_port, hour")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            slices,
            [
                (472_222, 0, 1001),
                (472_223, 0, 1001),
                (472_224, 1, 1001),
                // Only its end was in the trail: final, start not seen.
                (472_222, 1 | UNSEEN, 1003)
            ]
        );
        assert_eq!(trail::state(&w.conn).unwrap().sealed_hour, Some(472_224));
        // Migration 13 kept them in their table (no day has tables yet).
        assert_eq!(
            (
                crate::store::days::list(&w.conn).unwrap(),
                crate::store::days::legacy_until(&w.conn).unwrap()
            ),
            (vec![], Some(472_224))
        );
        let ask = |port: u16, at_s: i64| {
            who_at(
                &w.conn,
                port,
                chrono::DateTime::from_timestamp(at_s, 0).unwrap(),
            )
        };
        // Flow 1 asked about in its middle hour: the interim slice, resolved to its end.
        let a = ask(11_001, 1_700_003_600);
        assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        let f = &a.matches[0].flow;
        assert_eq!(
            (
                f.internal_port,
                f.start.as_deref(),
                f.end.as_deref(),
                f.bytes_out
            ),
            (
                1001,
                Some("2023-11-14T22:13:20Z"),
                Some("2023-11-15T00:13:20Z"),
                Some(7)
            )
        );
        let b = ask(11_002, 1_700_003_600);
        assert_eq!(b.status, WhoStatus::Found, "{b:?}");
        assert!(b.matches[0].flow.open && b.matches[0].flow.end.is_none());
        let c = ask(11_003, 1_700_000_500);
        assert_eq!(
            (c.status, c.matches[0].flow.start.as_deref()),
            (WhoStatus::Found, None)
        );
        assert_eq!(ask(11_003, 1_700_000_600).status, WhoStatus::None);
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The NEW or DESTROY of a one-minute flow started at `start` (ns), as the writer gets it.
    fn minute_flow(kind: EventKind, id: u32, sport: u16, start: u64) -> WriterMsg {
        let destroy = kind == EventKind::Destroy;
        let mut ev = crate::store::reconcile::test_flow(kind, id, sport);
        ev.start_ns = Some(start);
        ev.event_ns = Some(start + if destroy { 60_000_000_000 } else { 0 });
        ev.stop_ns = destroy.then_some(start + 60_000_000_000);
        WriterMsg::Flow { ev, received_ns: 0 }
    }

    /// A writer keeping `retain_days`, its directory and counters.
    fn retaining_writer(name: &str, retain_days: u32) -> (PathBuf, Arc<WriterStats>, Writer) {
        let dir = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = WriterConfig {
            db_path: dir.join("t.duckdb"),
            retain_days,
            ..WriterConfig::from_config(&crate::config::Config::default())
        };
        let stats = Arc::new(WriterStats::default());
        let w = Writer::open(&cfg, Arc::clone(&stats)).unwrap();
        (dir, stats, w)
    }

    /// A minute-long flow from `start`, written and committed.
    fn write_minute_flow(w: &mut Writer, id: u32, port: u16, start: u64) {
        w.write_batch([
            minute_flow(EventKind::New, id, port, start),
            minute_flow(EventKind::Destroy, id, port, start),
        ])
        .unwrap();
    }

    #[test]
    fn retention_removes_whole_old_hours_and_who_says_so() {
        use crate::query::coverage::HoleKind;
        use crate::query::who::WhoStatus;
        const T0: u64 = 1_700_000_000_000_000_000;
        const HOUR: u64 = 3_600_000_000_000;
        let (dir, stats, mut w) = retaining_writer("retain", 1);
        // One flow on day 0, one 26 hours later, one 50 hours later (its clock seals hour
        // 48 and keeps the last day: hours from 26 on).
        for (id, port, start) in [
            (1, 1001, T0),
            (2, 1002, T0 + 26 * HOUR),
            (3, 1003, T0 + 50 * HOUR),
        ] {
            write_minute_flow(&mut w, id, port, start);
        }
        assert!(stats.slices_expired.load(Ordering::Relaxed) >= 1);
        let oldest = stats.oldest_seconds.load(Ordering::Relaxed);
        assert_eq!(
            oldest,
            (T0 + 26 * HOUR) / 1_000_000_000,
            "oldest instant held"
        );
        w.conn
            .execute(
                "UPDATE capture_sessions SET started = make_timestamp(?)",
                [(T0 / 1_000 - 3_600_000_000) as i64],
            )
            .unwrap();
        let ask = |port: u16, at_ns: u64| {
            who_at(
                &w.conn,
                port,
                chrono::DateTime::from_timestamp_nanos(at_ns as i64),
            )
        };
        let gone = ask(1001, T0 + 30_000_000_000);
        assert_eq!(gone.status, WhoStatus::Incomplete, "{gone:?}");
        assert!(gone.matches.is_empty());
        assert!(
            gone.holes.iter().any(|h| h.kind == HoleKind::Retention
                && h.contains(((T0 + 30_000_000_000) / 1_000) as i64)),
            "{gone:?}"
        );
        let kept = ask(1002, T0 + 26 * HOUR + 30_000_000_000);
        assert_eq!(kept.status, WhoStatus::Found, "{kept:?}");
        let left: i64 = w
            .conn
            .query_row(
                "SELECT count(*) FROM flow_sealed WHERE src_port = 1001",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
        // Whole days: the first flow's day (14 November 2023) and the empty 15th are gone;
        // the 16th (the second flow's) is kept, and the third flow's hour is not sealed yet.
        assert_eq!(crate::store::days::list(&w.conn).unwrap(), [19_677]);
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The API keeps its connections between requests, with their prepared statements; each
    /// seal replaces a day's ends table by a rewritten one under the same name.
    #[test]
    fn a_kept_connection_reads_the_ends_table_each_seal_rewrites() {
        use EventKind::{Destroy, New};
        const T0: u64 = 1_700_000_000_000_000_000;
        const HOUR: u64 = 3_600_000_000_000;
        let (dir, _, stats, mut w) = test_writer("kept");
        let kept = w.conn.try_clone().unwrap();
        kept.execute(
            "UPDATE capture_sessions SET started = make_timestamp(?)",
            [(T0 / 1_000 - 3_600_000_000) as i64],
        )
        .unwrap();
        let ended = |id, port, start, end: u64| {
            let mut m = minute_flow(Destroy, id, port, start);
            if let WriterMsg::Flow { ev, .. } = &mut m {
                (ev.stop_ns, ev.event_ns) = (Some(end), Some(end));
            }
            m
        };
        let end_of = |port: u16| {
            let at = chrono::DateTime::from_timestamp_nanos((T0 + HOUR) as i64);
            let a = who_at(&kept, port, at);
            assert_eq!(a.matches.len(), 1, "{a:?}");
            a.matches[0].flow.end_us
        };
        // Two flows from 22:13 and 22:23; the first ends at 00:13, sealed by 01:30.
        w.write_batch([
            minute_flow(New, 1, 1001, T0),
            minute_flow(New, 2, 1002, T0 + HOUR / 6),
        ])
        .unwrap();
        w.write_batch([ended(1, 1001, T0, T0 + 2 * HOUR)]).unwrap();
        w.write_batch([minute_flow(New, 3, 1003, T0 + 3 * HOUR + HOUR / 4)])
            .unwrap();
        let sealed = stats.partitions_sealed.load(Ordering::Relaxed);
        assert!(sealed >= 1);
        assert_eq!(end_of(1001), Some(((T0 + 2 * HOUR) / 1_000) as i64));
        assert_eq!(end_of(1002), None, "still open");
        // The second ends at 02:23, sealed by 03:30: the day's ends table is written anew.
        w.write_batch([ended(2, 1002, T0 + HOUR / 6, T0 + 4 * HOUR)])
            .unwrap();
        w.write_batch([minute_flow(New, 4, 1004, T0 + 5 * HOUR + HOUR / 4)])
            .unwrap();
        assert!(stats.partitions_sealed.load(Ordering::Relaxed) > sealed);
        let ends: i64 = kept
            .query_row("SELECT count(*) FROM flow_ends_20231114", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ends, 2, "both ends where the lookups read them");
        assert_eq!(end_of(1001), Some(((T0 + 2 * HOUR) / 1_000) as i64));
        assert_eq!(end_of(1002), Some(((T0 + 4 * HOUR) / 1_000) as i64));
        drop((kept, w));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The events' clock is the kernel's: a system clock set ten years ahead for a moment (a
    /// bad RTC, a wrong NTP server) moved retention's horizon past every real day.
    #[test]
    fn a_clock_set_years_ahead_does_not_make_retention_remove_the_real_days() {
        use crate::query::who::WhoStatus;
        const T0: u64 = 1_700_000_000_000_000_000;
        const HOUR: u64 = 3_600_000_000_000;
        let (dir, stats, mut w) = retaining_writer("jump", 2);
        // Two real days (14 and 16 November 2023), then one flow stamped 2033.
        for (id, port, start) in [
            (1, 1001, T0),
            (2, 1002, T0 + 26 * HOUR),
            (3, 1003, T0 + 3_650 * 24 * HOUR),
        ] {
            write_minute_flow(&mut w, id, port, start);
        }
        // Sealed by the jump, and kept: the newest two days that hold slices.
        assert!(stats.partitions_sealed.load(Ordering::Relaxed) >= 1);
        assert_eq!(stats.slices_expired.load(Ordering::Relaxed), 0);
        let days = crate::store::days::list(&w.conn).unwrap();
        assert_eq!(days.first(), Some(&19_675), "{days:?}");
        assert_eq!(days.last(), Some(&19_677), "{days:?}");
        w.conn
            .execute(
                "UPDATE capture_sessions SET started = make_timestamp(?)",
                [(T0 / 1_000 - 3_600_000_000) as i64],
            )
            .unwrap();
        for (port, at) in [(1001, T0), (1002, T0 + 26 * HOUR)] {
            let a = who_at(
                &w.conn,
                port,
                chrono::DateTime::from_timestamp_nanos((at + 30_000_000_000) as i64),
            );
            assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        }
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A flow whose NEW was lost (seen only at its end) stands for one event, not two: the
    /// events view counts what the trail received, before and after its hour is sealed.
    #[test]
    fn a_flow_seen_only_at_its_end_stands_for_its_end_alone() {
        use EventKind::{Destroy, New};
        const T0: u64 = 1_700_000_000_000_000_000;
        const HOUR: u64 = 3_600_000_000_000;
        let (dir, _, stats, mut w) = test_writer("unseen");
        // Flow 1: its end only. Flow 2: both. Flow 3: its start only (still open).
        w.write_batch([
            minute_flow(Destroy, 1, 1001, T0),
            minute_flow(New, 2, 1002, T0),
            minute_flow(Destroy, 2, 1002, T0),
            minute_flow(New, 3, 1003, T0),
        ])
        .unwrap();
        let by_kind = |w: &Writer| -> Vec<(u8, i64)> {
            let mut st = w
                .conn
                .prepare("SELECT kind, count(*) FROM conntrack_events GROUP BY kind ORDER BY kind")
                .unwrap();
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(by_kind(&w), [(1, 2), (2, 2)], "four events received");
        // A flow three hours on moves the clock past the seal of the first hour.
        w.write_batch([minute_flow(New, 4, 1004, T0 + 3 * HOUR)])
            .unwrap();
        assert!(stats.partitions_sealed.load(Ordering::Relaxed) >= 1);
        assert_eq!(by_kind(&w), [(1, 3), (2, 2)], "five events received");
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
