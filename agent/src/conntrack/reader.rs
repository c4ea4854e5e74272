//! The conntrack reader thread: start-up dump, then NEW/DESTROY events, decoded and sent on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::Sender;
use tracing::{debug, info, warn};

use super::decode::{self, Message};
use super::event::{EventKind, FlowEvent, now_ns};
use super::socket::{NfSocket, Recv, SocketError};
use crate::config::CaptureFilter;
use crate::pipeline::ratelimit::RateLimitedLog;
use crate::store::writer::WriterMsg;

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

/// Counters of the reader.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Datagrams read from the event socket.
    pub datagrams: AtomicU64,
    /// Flow messages decoded (events and dump entries).
    pub decoded: AtomicU64,
    /// Messages that failed to decode.
    pub decode_errors: AtomicU64,
    /// Flows left out by the capture filter.
    pub filtered: AtomicU64,
    /// Events handed to the writer.
    pub forwarded: AtomicU64,
    /// ENOBUFS seen on the event socket.
    pub overflows: AtomicU64,
    /// Entries received from dumps.
    pub dumped: AtomicU64,
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
const RECV_BUF: usize = 1 << 20;

/// The conntrack source.
pub struct Reader {
    cfg: ReaderConfig,
    events: NfSocket,
    tx: Sender<WriterMsg>,
    stats: Arc<ReaderStats>,
    decode_log: RateLimitedLog,
}

impl Reader {
    /// Opens and subscribes the event socket. Call before anything else reads the table, so
    /// no event between dump and subscription is missed.
    pub fn open(
        cfg: ReaderConfig,
        tx: Sender<WriterMsg>,
        stats: Arc<ReaderStats>,
    ) -> Result<Self, ReaderError> {
        let events = NfSocket::events(cfg.rcvbuf_bytes, RECV_TIMEOUT)?;
        info!(
            requested = cfg.rcvbuf_bytes,
            effective = events.rcvbuf(),
            port_id = events.port_id(),
            "subscribed to conntrack NEW and DESTROY events"
        );
        Ok(Reader {
            cfg,
            events,
            tx,
            stats,
            decode_log: RateLimitedLog::new(Duration::from_secs(60)),
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

    /// Sends a message to the writer; false once the writer is gone.
    fn forward(&self, msg: WriterMsg) -> bool {
        self.tx.send(msg).is_ok()
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
                    if !self.forward(WriterMsg::Flow { ev, received_ns }) {
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
        let sock = NfSocket::open(self.cfg.rcvbuf_bytes, Duration::from_secs(5))?;
        if !self.forward(WriterMsg::DumpBegin) {
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
        self.forward(WriterMsg::DumpEnd {
            at_ns: now_ns(),
            alive_until_ns,
        });
        info!(entries = n, "conntrack table dumped");
        Ok(n)
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
        while !shutdown.load(Ordering::Relaxed) {
            match self.events.recv(&mut buf).map_err(ReaderError::Recv)? {
                Recv::Data(n) => {
                    self.stats.datagrams.fetch_add(1, Ordering::Relaxed);
                    let received = now_ns();
                    last_ok = received;
                    // Split borrow: the buffer is not touched by handle_datagram.
                    let data = std::mem::take(&mut buf);
                    let end = self.handle_datagram(&data[..n], false, received);
                    buf = data;
                    if matches!(end, DatagramEnd::WriterGone) {
                        break;
                    }
                }
                Recv::Timeout => last_ok = now_ns(),
                Recv::Overflow => {
                    let n = self.stats.overflows.fetch_add(1, Ordering::Relaxed) + 1;
                    warn!(
                        overflows = n,
                        "conntrack event socket overflowed (ENOBUFS): events were lost; resyncing"
                    );
                    self.dump(Some(last_ok))?;
                    last_ok = now_ns();
                }
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
