//! The conntrack reader thread: start-up dump, then NEW/DESTROY events, decoded and sent on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::decode::{self, Message};
use super::netlink_drops;
use super::socket::{NfSocket, Recv, SocketError};
use crate::config::CaptureFilter;
use crate::pipeline::clock::now_ns;
use crate::pipeline::flow::{EventKind, FlowEvent};
use crate::pipeline::messages::WriterMsg;
use crate::pipeline::metrics::counters;
use crate::pipeline::ratelimit::RateLimitedLog;
use crate::pipeline::stage::{Sent, StageTx};

/// Source name of gaps caused by the kernel dropping events on our socket.
pub const GAP_SOURCE_KERNEL: &str = "conntrack";
/// Source name of gaps caused by the reader→writer backlog dropping events.
pub const GAP_SOURCE_BACKLOG: &str = "conntrack->writer";

/// Reader settings.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// Receive buffer (SO_RCVBUFFORCE).
    pub rcvbuf_bytes: usize,
    /// Which flows to keep.
    pub filter: CaptureFilter,
    /// Dump the table before reading events.
    pub dump_at_start: bool,
    /// Lower bound for flows found gone by the start-up dump (previous session's end).
    pub alive_until_ns: Option<u64>,
}

counters! {
    /// Counters of the reader.
    pub struct ReaderStats as "conntrack" =>
    /// A reading of [`ReaderStats`].
    ReaderCounters {
        /// Datagrams read from the event socket.
        datagrams: Counter,
        /// Flow messages decoded (events and dump entries).
        decoded: Counter(Received),
        /// Messages that failed to decode.
        decode_errors: Counter(Lost),
        /// Flows left out by the capture filter.
        filtered: Counter(Skipped),
        /// Events handed to the writer.
        forwarded: Counter(Sent),
        /// ENOBUFS seen on the event socket.
        overflows: Counter,
        /// Events the kernel dropped on the event socket (its drop counter since we opened it).
        kernel_dropped: Counter(Lost),
        /// Resyncs (dumps after a loss).
        resyncs: Counter,
        /// Entries received from dumps.
        dumped: Counter,
    }
}

/// Errors that stop the reader.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// Socket set-up or dump request failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// recv(2) failed with something other than a timeout or overflow.
    #[error("receiving from the conntrack netlink socket: {0}")]
    Recv(std::io::Error),
    /// The kernel refused the dump request.
    #[error("conntrack dump refused by the kernel: {0}")]
    DumpRefused(std::io::Error),
}

const RECV_TIMEOUT: Duration = Duration::from_millis(200);
/// After reading the queue empty, the reader sleeps this long before waiting again, so the
/// events of a busy gateway are read (and handed to the writer) in batches, one wakeup per
/// batch instead of one per event. 25 ms of events at 200k/s is about 6 MB of the 64 MiB
/// socket buffer; a drain longer than `COALESCE_BELOW` datagrams (the queue is filling
/// faster than that) skips the sleep. The trail does not wait for it: rows are committed
/// once a second.
const COALESCE: Duration = Duration::from_millis(25);
/// Datagrams per drain under which the reader sleeps `COALESCE` before the next.
const COALESCE_BELOW: u32 = 4_096;
/// Dumps in one resync at most, while events keep being dropped during them.
const MAX_DUMPS_PER_RESYNC: u32 = 8;
/// How often the kernel drop counter is compared with what we accounted: drops while the
/// socket is already congested raise no ENOBUFS.
const DROP_CHECK_EVERY: Duration = Duration::from_secs(1);
const RECV_BUF: usize = 1 << 20;

/// One reading of the event socket's drop counter (None when /proc/net/netlink lacks it).
#[derive(Debug, Clone, Copy)]
struct DropReading {
    begun_ns: u64,
    value: Option<u64>,
    done_ns: u64,
}

/// Events dropped by the backlog since the trail was last known complete.
#[derive(Debug, Clone, Copy)]
struct BacklogLoss {
    start_ns: u64,
    dropped: u64,
}

/// The conntrack source.
pub struct Reader {
    cfg: ReaderConfig,
    events: NfSocket,
    tx: StageTx<WriterMsg>,
    stats: Arc<ReaderStats>,
    decode_log: RateLimitedLog,
    overflow_log: RateLimitedLog,
    /// The socket's kernel drop counter at the last gap (or at open).
    drops_seen: Option<u64>,
    backlog_loss: Option<BacklogLoss>,
}

/// The writer is gone: stop reading.
struct WriterGone;

impl Reader {
    /// Opens and subscribes the event socket. Call before anything else reads the table, so
    /// no event between dump and subscription is missed.
    pub fn open(
        cfg: ReaderConfig,
        tx: StageTx<WriterMsg>,
        stats: Arc<ReaderStats>,
    ) -> Result<Self, ReaderError> {
        let events = NfSocket::events(cfg.rcvbuf_bytes, RECV_TIMEOUT)?;
        info!(
            requested = cfg.rcvbuf_bytes,
            effective = events.rcvbuf(),
            port_id = events.port_id(),
            "subscribed to conntrack NEW and DESTROY events"
        );
        let drops_seen = netlink_drops::read(events.port_id());
        if drops_seen.is_none() {
            warn!(
                port_id = events.port_id(),
                "cannot read the socket's drop counter from /proc/net/netlink: losses will be recorded without a count"
            );
        }
        Ok(Reader {
            cfg,
            events,
            tx,
            stats,
            decode_log: RateLimitedLog::new(Duration::from_secs(60)),
            overflow_log: RateLimitedLog::new(Duration::from_secs(60)),
            drops_seen,
            backlog_loss: None,
        })
    }

    /// The event socket's netlink port id.
    pub fn port_id(&self) -> u32 {
        self.events.port_id()
    }

    fn keep(&self, ev: &FlowEvent) -> bool {
        match self.cfg.filter {
            CaptureFilter::All => true,
            CaptureFilter::Snat => ev.is_src_nat(),
        }
    }

    /// Sends a message that must not be lost (control messages, dump entries).
    fn forward_wait(&self, msg: WriterMsg) -> Result<(), WriterGone> {
        self.tx.send_wait(msg).map_err(|_| WriterGone)
    }

    /// Offers a live event to the backlog; a drop opens (or extends) a backlog loss.
    fn forward_event(&mut self, msg: WriterMsg, received_ns: u64) -> Result<(), WriterGone> {
        match self.tx.send(msg).map_err(|_| WriterGone)? {
            Sent::Forwarded => {}
            Sent::Dropped => {
                self.backlog_loss
                    .get_or_insert(BacklogLoss {
                        start_ns: received_ns,
                        dropped: 0,
                    })
                    .dropped += 1;
            }
        }
        Ok(())
    }

    fn handle_datagram(&mut self, buf: &[u8], from_dump: bool, received_ns: u64) -> DatagramEnd {
        let mut end = DatagramEnd::More;
        for msg in decode::messages(buf, from_dump) {
            match msg {
                Ok(Message::Flow(ev)) => {
                    self.stats.decoded.fetch_add(1, Ordering::Relaxed);
                    if from_dump {
                        self.stats.dumped.fetch_add(1, Ordering::Relaxed);
                    }
                    if ev.kind == EventKind::Update {
                        continue;
                    }
                    if !self.keep(&ev) {
                        self.stats.filtered.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let msg = WriterMsg::Flow { ev, received_ns };
                    let sent = if from_dump {
                        self.forward_wait(msg)
                    } else {
                        self.forward_event(msg, received_ns)
                    };
                    if sent.is_err() {
                        return DatagramEnd::WriterGone;
                    }
                    self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Message::Done) => end = DatagramEnd::Done,
                Ok(Message::Error(0)) | Ok(Message::Ignored(_)) => {}
                Ok(Message::Error(code)) => end = DatagramEnd::Error(-code),
                Err(e) => {
                    let n = self.stats.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(suppressed) = self.decode_log.allow() {
                        warn!(error = %e, total = n, suppressed, "undecodable conntrack message skipped");
                    }
                }
            }
        }
        end
    }

    /// Dumps the conntrack table through a separate socket and forwards every entry, framed by
    /// DumpBegin/DumpEnd so the writer can close flows that vanished.
    pub fn dump(&mut self, alive_until_ns: Option<u64>) -> Result<u64, ReaderError> {
        // Dumps are flow-controlled by the kernel, but a roomy buffer saves round trips.
        let sock = NfSocket::open(self.cfg.rcvbuf_bytes.max(1 << 20), Duration::from_secs(5))?;
        if self.forward_wait(WriterMsg::DumpBegin).is_err() {
            return Ok(0);
        }
        let before = self.stats.dumped.load(Ordering::Relaxed);
        sock.request_dump(1)?;
        let mut buf = Vec::with_capacity(RECV_BUF);
        loop {
            match sock.recv(&mut buf).map_err(ReaderError::Recv)? {
                Recv::Data(n) => {
                    let received = now_ns();
                    let data = std::mem::take(&mut buf);
                    let end = self.handle_datagram(&data[..n], true, received);
                    buf = data;
                    match end {
                        DatagramEnd::Done => break,
                        DatagramEnd::Error(errno) => {
                            return Err(ReaderError::DumpRefused(
                                std::io::Error::from_raw_os_error(errno),
                            ));
                        }
                        DatagramEnd::WriterGone => return Ok(0),
                        DatagramEnd::More => {}
                    }
                }
                Recv::Timeout => {
                    return Err(ReaderError::Recv(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer to the conntrack dump within 5 s",
                    )));
                }
                Recv::Overflow => {
                    // The dump socket overflowed: the dump is incomplete; ask again.
                    warn!("conntrack dump overflowed its socket buffer; dumping again");
                    return self.dump(alive_until_ns);
                }
            }
        }
        let n = self.stats.dumped.load(Ordering::Relaxed) - before;
        let _ = self.forward_wait(WriterMsg::DumpEnd {
            at_ns: now_ns(),
            alive_until_ns,
        });
        info!(entries = n, "conntrack table dumped");
        Ok(n)
    }

    /// Closes the holes in the trail: dumps the table (recovering flows whose NEW was lost,
    /// closing flows whose DESTROY was lost with an end bounded by the hole), then records a
    /// gap for the kernel overflow starting at `kernel_since` and one for the backlog's drops.
    /// Returns the instant the trail is known complete until: the last reading of the drop
    /// counter. When drops kept racing every dump, those of the last dump are left
    /// unaccounted, so the drop-counter check resyncs again from before that dump.
    fn resync(&mut self, kernel_since: Option<u64>) -> Result<u64, ReaderError> {
        let backlog = self.backlog_loss.take();
        let since = [kernel_since, backlog.map(|b| b.start_ns)]
            .into_iter()
            .flatten()
            .min();
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        // While we dump, the event socket is not read: it stays full and "congested", and the
        // kernel drops further events without raising ENOBUFS again. A dump that raced such
        // drops may have missed their flows, so dump again until one completes without new
        // drops (bounded; the periodic drop-counter check catches the rest).
        let mut accounted = self.read_drops();
        for attempt in 1..=MAX_DUMPS_PER_RESYNC {
            self.dump(since)?;
            let after = self.read_drops();
            let raced = matches!((accounted.value, after.value), (Some(b), Some(a)) if a > b);
            if !raced {
                accounted = after;
                break;
            }
            if attempt == MAX_DUMPS_PER_RESYNC {
                // The flows of drops during this dump may be missing: leave those drops
                // unaccounted, so the drop-counter check sees them and resyncs again.
                warn!(
                    dumps = attempt,
                    "events kept being dropped during every resync dump; resyncing again shortly"
                );
                break;
            }
            accounted = after;
            debug!(
                attempt,
                "events were dropped during the resync dump; dumping again"
            );
        }
        let now = accounted.value;
        // Every drop counted happened before the reading returned; every drop not counted
        // happened after it began.
        let (end_ns, complete_until) = (accounted.done_ns, accounted.begun_ns);
        if let Some(start_ns) = kernel_since {
            let lost = match (self.drops_seen, now) {
                (Some(before), Some(now)) => Some(now.saturating_sub(before)),
                _ => None,
            };
            if now.is_some() {
                self.drops_seen = now;
            }
            if let Some(n) = lost {
                self.stats.kernel_dropped.fetch_add(n, Ordering::Relaxed);
            }
            let _ = self.forward_wait(WriterMsg::Gap {
                source: GAP_SOURCE_KERNEL,
                start_ns,
                end_ns,
                lost,
                reason: "netlink receive buffer overflow (ENOBUFS); resynced by a table dump",
            });
        }
        if let Some(b) = backlog {
            let _ = self.forward_wait(WriterMsg::Gap {
                source: GAP_SOURCE_BACKLOG,
                start_ns: b.start_ns,
                end_ns,
                lost: Some(b.dropped),
                reason: "writer backlog full: newest events dropped; resynced by a table dump",
            });
        }
        Ok(complete_until)
    }

    /// The kernel's drop counter of the event socket, with when it was read.
    fn read_drops(&self) -> DropReading {
        let begun_ns = now_ns();
        let value = netlink_drops::read(self.port_id());
        DropReading {
            begun_ns,
            value,
            done_ns: now_ns(),
        }
    }

    /// Runs until `shutdown` is set or the writer goes away; sets `ready` once the start-up
    /// dump is done, so "running" means every open flow is in the trail.
    pub fn run(
        mut self,
        shutdown: Arc<AtomicBool>,
        ready: Arc<AtomicBool>,
    ) -> Result<(), ReaderError> {
        if self.cfg.dump_at_start {
            self.dump(self.cfg.alive_until_ns)?;
        }
        ready.store(true, Ordering::Relaxed);
        let mut buf = Vec::with_capacity(RECV_BUF);
        // Last instant the event stream was known complete: the lower bound of a loss window.
        let mut last_ok = now_ns();
        // After a dump the event socket is full and "congested": the kernel drops further
        // events without raising ENOBUFS until its queue has been read empty, so data read
        // then does not prove the stream complete.
        let mut congested = false;
        let mut last_drop_check = std::time::Instant::now();
        // Datagrams read since the last wait: while non-zero the reader drains without waiting.
        let mut drained: u32 = 0;
        while !shutdown.load(Ordering::Relaxed) {
            if last_drop_check.elapsed() >= DROP_CHECK_EVERY {
                last_drop_check = std::time::Instant::now();
                let reading = self.read_drops();
                let now = reading.value;
                if now.is_some() && now == self.drops_seen {
                    // No drop so far: complete until the check even while congested.
                    last_ok = last_ok.max(reading.begun_ns);
                }
                if let (Some(seen), Some(now)) = (self.drops_seen, now)
                    && now > seen
                {
                    warn!(
                        dropped = now - seen,
                        "the kernel dropped conntrack events without ENOBUFS (socket was congested); resyncing"
                    );
                    last_ok = self.resync(Some(last_ok))?;
                    congested = true;
                }
            }
            // Outside congestion a drop before this call would make recv report ENOBUFS
            // before any data, so data returned means the stream was complete until now.
            let before_recv = now_ns();
            let got = if drained > 0 {
                self.events.recv_nowait(&mut buf)
            } else {
                self.events.recv(&mut buf)
            };
            match got.map_err(ReaderError::Recv)? {
                Recv::Data(n) => {
                    drained = drained.saturating_add(1);
                    self.stats.datagrams.fetch_add(1, Ordering::Relaxed);
                    let received = now_ns();
                    if !congested {
                        last_ok = before_recv;
                    }
                    // Split borrow: the buffer is not touched by handle_datagram.
                    let data = std::mem::take(&mut buf);
                    let end = self.handle_datagram(&data[..n], false, received);
                    buf = data;
                    if matches!(end, DatagramEnd::WriterGone) {
                        break;
                    }
                }
                Recv::Timeout => {
                    // The queue ran empty. Outside congestion a drop would have raised
                    // ENOBUFS, so the stream was complete until now. While congested (after a
                    // dump) the kernel drops silently: the drop counter decides, or a gap
                    // found later would start after the flows it lost.
                    let reading = congested.then(|| self.read_drops());
                    match (self.drops_seen, reading.and_then(|r| r.value)) {
                        (Some(seen), Some(now)) if now > seen => {
                            warn!(
                                dropped = now - seen,
                                "the kernel dropped conntrack events while the socket was congested; resyncing"
                            );
                            last_ok = self.resync(Some(last_ok))?;
                        }
                        (_, Some(_)) => {
                            congested = false;
                            last_ok = last_ok.max(reading.map_or(0, |r| r.begun_ns));
                        }
                        _ => {
                            congested = false;
                            last_ok = now_ns();
                        }
                    }
                    let batch = std::mem::take(&mut drained);
                    if batch > 0 && batch < COALESCE_BELOW {
                        std::thread::sleep(COALESCE);
                    }
                }
                Recv::Overflow => {
                    let n = self.stats.overflows.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(suppressed) = self.overflow_log.allow() {
                        warn!(
                            overflows = n,
                            suppressed,
                            "conntrack event socket overflowed (ENOBUFS): events were lost; resyncing"
                        );
                    }
                    last_ok = self.resync(Some(last_ok))?;
                    congested = true;
                }
            }
            // Backlog drops are repaired once the writer has caught up, not while it is
            // still behind (a dump then would only be dropped in turn).
            if self.backlog_loss.is_some() && self.tx.below_mark() {
                // Kernel drops during these dumps get no gap here: the drop-counter check
                // finds them, and its gap starts before this resync.
                self.resync(None)?;
                congested = true;
            }
        }
        debug!("conntrack reader stopped");
        Ok(())
    }
}

enum DatagramEnd {
    More,
    Done,
    Error(i32),
    WriterGone,
}
