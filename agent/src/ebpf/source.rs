//! Loads the process programs and the socket programs (two objects: either can be refused
//! while the other runs), attaches them, and reads their ring buffers on a thread of its own
//! into the writer's stage. Reservation failures (a full ring) are counted by the programs
//! per CPU; read every second, they become capture gaps of source `ebpf`.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, RawTracePoint,
};
use aya::{Btf, Ebpf, EbpfLoader};
use nix::time::{ClockId, clock_gettime};
use tracing::warn;

use super::event::{Record, decode};
use crate::pipeline::clock::now_ns;
use crate::pipeline::messages::WriterMsg;
use crate::pipeline::metrics::counters;
use crate::pipeline::ratelimit::RateLimitedLog;
use crate::pipeline::stage::StageTx;

/// The compiled programs (agent/build.rs), aligned as aya needs them.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/process.bpf.o"));
static SOCKET_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socket.bpf.o"));

/// How often the reader drains the rings unwoken: the socket program wakes it only once
/// 64 KiB are waiting (agent-ebpf/src/socket.bpf.c), so a lone record waits up to this.
const WAKE_POLL_MS: u16 = 20;

/// The socket programs that take the owner at connect() and sendmsg().
const OWNER_PROGRAMS: [&str; 4] = [
    "nattrail_connect4",
    "nattrail_connect6",
    "nattrail_sendmsg4",
    "nattrail_sendmsg6",
];
/// The owner at socket(): optional, as not every kernel lets it use socket storage.
const SOCK_CREATE_PROGRAM: &str = "nattrail_sock_create";
/// The program that reports each socket's first packet to a destination.
const EGRESS_PROGRAM: &str = "nattrail_egress";

/// The exec program, by its C function name.
pub const EXEC_PROGRAM: &str = "nattrail_exec";
/// The fork and exit programs, and their tracepoints.
const LIFE_PROGRAMS: [(&str, &str); 2] = [
    ("nattrail_fork", "sched_process_fork"),
    ("nattrail_exit", "sched_process_exit"),
];

counters! {
    /// Counters of the eBPF process source.
    pub struct EbpfStats as "ebpf" =>
    /// A reading of [`EbpfStats`].
    EbpfCounters {
        /// Records read from the ring buffers (execs, forks, exits, sockets).
        records_received: Counter(Received),
        /// Of them, from the exec program.
        exec_records: Counter(Received),
        /// Of them, from the fork and exit programs.
        fork_exit_records: Counter(Received),
        /// Of them, from the egress program (a socket's first packet to a destination).
        socket_records: Counter(Received),
        /// Records handed to the writer.
        records_sent: Counter(Sent),
        /// Records the programs could not write (ring buffer full), as they counted them.
        records_lost: Counter(Lost),
        /// Records refused by the decoder (size or version).
        malformed: Counter(Lost),
        /// Programs attached and running.
        programs_attached: Gauge,
    }
}

/// Why the programs are not running.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The object did not load (verifier, BTF, permissions).
    #[error("loading the eBPF object: {}", chain(.0))]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object or refused by the kernel.
    #[error("eBPF program {name}: {detail}")]
    Program {
        /// The program.
        name: String,
        /// The kernel's or aya's message.
        detail: String,
    },
    /// A map is missing or of another type.
    #[error("eBPF map {name}: {detail}")]
    Map {
        /// The map.
        name: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// An error and its causes, on one line: the kernel's errno sits at the end of aya's chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Which programs to run.
#[derive(Debug, Clone)]
pub struct EbpfSourceConfig {
    /// The exec program's name (the config can name another, e.g. to test a refused load);
    /// None: no process programs.
    pub exec_program: Option<String>,
    /// Also the fork and exit programs.
    pub fork_exit: bool,
    /// The socket programs, attached to this cgroup-v2 directory (the root, so that every
    /// socket of the host and its containers is seen); None: no socket programs.
    pub socket_cgroup: Option<std::path::PathBuf>,
}

/// One ring buffer and its loss counter.
struct Feed {
    sockets: bool,
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    seen: u64,
    reason: &'static str,
}

fn take_feed(
    bpf: &mut Ebpf,
    ring: &'static str,
    lost: &'static str,
    reason: &'static str,
) -> Result<Feed, EbpfError> {
    let mut map = |name: &'static str| {
        bpf.take_map(name).ok_or(EbpfError::Map {
            name,
            detail: "not in the eBPF object".into(),
        })
    };
    let ring_buf = RingBuf::try_from(map(ring)?).map_err(|e| EbpfError::Map {
        name: ring,
        detail: e.to_string(),
    })?;
    let counter: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(map(lost)?).map_err(|e| EbpfError::Map {
            name: lost,
            detail: e.to_string(),
        })?;
    Ok(Feed {
        sockets: ring == "socket_events",
        seen: lost_total(&counter),
        ring: ring_buf,
        lost: counter,
        reason,
    })
}

fn program_error(name: &str) -> impl Fn(String) -> EbpfError + '_ {
    move |detail| EbpfError::Program {
        name: name.to_string(),
        detail,
    }
}

/// The program `name` of the object, as the kind `P` its section makes it.
fn program_of<'a, P>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = program_error(name);
    bpf.program_mut(name)
        .ok_or_else(|| program("not in the eBPF object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| program(e.to_string()))
}

fn load_processes(
    exec_program: &str,
    fork_exit: bool,
    btf: Option<&Btf>,
    stats: &EbpfStats,
) -> Result<(Ebpf, Feed), EbpfError> {
    let mut bpf = EbpfLoader::new().btf(btf).load(OBJECT)?;
    let mut wanted = vec![(exec_program, "sched_process_exec")];
    if fork_exit {
        wanted.extend(LIFE_PROGRAMS);
    }
    for (name, tracepoint) in wanted {
        let program = program_error(name);
        let prog: &mut RawTracePoint = program_of(&mut bpf, name)?;
        prog.load().map_err(|e| program(chain(&e)))?;
        prog.attach(tracepoint).map_err(|e| program(chain(&e)))?;
        stats.programs_attached.fetch_add(1, Ordering::Relaxed);
    }
    let feed = take_feed(
        &mut bpf,
        "process_events",
        "process_lost",
        "process records lost: the eBPF ring buffer was full",
    )?;
    Ok((bpf, feed))
}

/// Loads the socket programs and attaches them to `cgroup`. The programs that take the owner
/// go first, so that no socket reaches egress before its owner could be recorded.
fn load_sockets(
    cgroup: &std::path::Path,
    btf: Option<&Btf>,
    stats: &EbpfStats,
) -> Result<(Ebpf, Feed), EbpfError> {
    let mut bpf = EbpfLoader::new().btf(btf).load(SOCKET_OBJECT)?;
    let dir = std::fs::File::open(cgroup).map_err(|e| EbpfError::Program {
        name: EGRESS_PROGRAM.into(),
        detail: format!("opening the cgroup {}: {e}", cgroup.display()),
    })?;
    // A BPF link (which aya uses from Linux 5.7 on; the ring buffer needs 5.8) always lets
    // other programs attach beside ours, and the kernel refuses any attach flag on a link:
    // "multiple" would fail with EINVAL.
    let mode = CgroupAttachMode::Single;
    for name in OWNER_PROGRAMS {
        let program = program_error(name);
        let prog: &mut CgroupSockAddr = program_of(&mut bpf, name)?;
        prog.load().map_err(|e| program(chain(&e)))?;
        prog.attach(&dir, mode).map_err(|e| program(chain(&e)))?;
        stats.programs_attached.fetch_add(1, Ordering::Relaxed);
    }
    // Optional: connect() and sendmsg() name the owner of every socket that sends.
    let created = (|| -> Result<(), EbpfError> {
        let program = program_error(SOCK_CREATE_PROGRAM);
        let prog: &mut CgroupSock = program_of(&mut bpf, SOCK_CREATE_PROGRAM)?;
        prog.load().map_err(|e| program(chain(&e)))?;
        prog.attach(&dir, mode).map_err(|e| program(chain(&e)))?;
        Ok(())
    })();
    match created {
        Ok(()) => {
            stats.programs_attached.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            warn!(error = %e, "eBPF program not loaded: socket owners are taken at connect() and sendmsg() only")
        }
    }
    let program = program_error(EGRESS_PROGRAM);
    let prog: &mut CgroupSkb = program_of(&mut bpf, EGRESS_PROGRAM)?;
    prog.load().map_err(|e| program(chain(&e)))?;
    prog.attach(&dir, CgroupSkbAttachType::Egress, mode)
        .map_err(|e| program(chain(&e)))?;
    stats.programs_attached.fetch_add(1, Ordering::Relaxed);
    let feed = take_feed(
        &mut bpf,
        "socket_events",
        "socket_lost",
        "socket records lost: the eBPF ring buffer was full",
    )?;
    Ok((bpf, feed))
}

/// What the process programs record, for the log line of a refusal.
pub const PROCESSES: &str = "process executions";
/// What the socket programs record.
pub const SOCKETS: &str = "socket owners";

/// What [`EbpfSource::start`] got running.
#[derive(Default)]
pub struct Started {
    /// The reader, when anything loaded.
    pub source: Option<EbpfSource>,
    /// The process programs run.
    pub processes: bool,
    /// The socket programs run.
    pub sockets: bool,
    /// What was refused: what it leaves unrecorded, and why.
    pub refused: Vec<(&'static str, EbpfError)>,
}

/// The running source; dropped or stopped, the programs are detached.
pub struct EbpfSource {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn ns(clock: ClockId) -> i128 {
    clock_gettime(clock).map_or(0, |t| {
        i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
    })
}

/// Wall clock minus boot clock: what turns the programs' CLOCK_BOOTTIME into wall time.
fn boot_to_wall() -> i128 {
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_BOOTTIME)
}

impl EbpfSource {
    /// Loads and attaches the programs and starts reading. Each object that failed is one
    /// error naming what failed, with what it leaves unrecorded; the source runs with what
    /// loaded.
    pub fn start(cfg: &EbpfSourceConfig, tx: StageTx<WriterMsg>, stats: Arc<EbpfStats>) -> Started {
        let btf = Btf::from_sys_fs().ok();
        let mut objects = Vec::new();
        let mut feeds = Vec::new();
        let mut started = Started::default();
        if let Some(exec) = &cfg.exec_program {
            match load_processes(exec, cfg.fork_exit, btf.as_ref(), &stats) {
                Ok((bpf, feed)) => {
                    objects.push(bpf);
                    feeds.push(feed);
                    started.processes = true;
                }
                Err(e) => started.refused.push((PROCESSES, e)),
            }
        }
        if let Some(cgroup) = &cfg.socket_cgroup {
            match load_sockets(cgroup, btf.as_ref(), &stats) {
                Ok((bpf, feed)) => {
                    objects.push(bpf);
                    feeds.push(feed);
                    started.sockets = true;
                }
                Err(e) => started.refused.push((SOCKETS, e)),
            }
        }
        if feeds.is_empty() {
            stats.programs_attached.store(0, Ordering::Relaxed);
            return started;
        }
        let snapshot = started.processes;
        let stop = Arc::new(AtomicBool::new(false));
        let spawned = {
            let stop = Arc::clone(&stop);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("ebpf".into())
                .spawn(move || read(objects, feeds, snapshot, tx, stats, stop))
        };
        match spawned {
            Ok(thread) => {
                started.source = Some(EbpfSource {
                    stop,
                    thread: Some(thread),
                });
            }
            Err(e) => {
                stats.programs_attached.store(0, Ordering::Relaxed);
                let what = if started.sockets { SOCKETS } else { PROCESSES };
                started.processes = false;
                started.sockets = false;
                started.refused.push((
                    what,
                    EbpfError::Program {
                        name: "reader".into(),
                        detail: format!("starting its reader thread: {e}"),
                    },
                ));
            }
        }
        started
    }

    /// Detaches the programs once the ring buffer is drained.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EbpfSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lost_total(lost: &PerCpuArray<MapData, u64>) -> u64 {
    lost.get(&0, 0).map_or(0, |v| v.iter().sum())
}

/// The reader: waits on the rings' fds, drains them, and once a second turns new
/// reservation failures into gaps. `_objects` keep the programs attached while it runs.
fn read(
    _objects: Vec<Ebpf>,
    mut feeds: Vec<Feed>,
    snapshot: bool,
    tx: StageTx<WriterMsg>,
    stats: Arc<EbpfStats>,
    stop: Arc<AtomicBool>,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut offset = boot_to_wall();
    // What was alive before the process programs were attached (they were attached already).
    if snapshot {
        for p in super::proc_snapshot::snapshot(std::path::Path::new("/proc"), now_ns(), offset) {
            if tx.send_wait(WriterMsg::Exec(Box::new(p))).is_err() {
                return;
            }
        }
    }
    if feeds.iter().any(|f| f.sockets)
        && tx
            .send_wait(WriterMsg::SocketsAttached { at_ns: now_ns() })
            .is_err()
    {
        return;
    }
    let mut checked = (Instant::now(), now_ns());
    let mut bad = RateLimitedLog::new(Duration::from_secs(60));
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        {
            let mut fds: Vec<PollFd> = feeds
                .iter()
                .map(|f| PollFd::new(f.ring.as_fd(), PollFlags::POLLIN))
                .collect();
            let _ = poll(&mut fds, PollTimeout::from(WAKE_POLL_MS));
        }
        for feed in &mut feeds {
            while let Some(item) = feed.ring.next() {
                stats.records_received.fetch_add(1, Ordering::Relaxed);
                let msg = match decode(&item, offset) {
                    Ok(Record::Exec(ev)) => {
                        stats.exec_records.fetch_add(1, Ordering::Relaxed);
                        WriterMsg::Exec(Box::new(ev))
                    }
                    Ok(Record::Life(ev)) => {
                        stats.fork_exit_records.fetch_add(1, Ordering::Relaxed);
                        WriterMsg::Life(ev)
                    }
                    Ok(Record::Socket(ev)) => {
                        stats.socket_records.fetch_add(1, Ordering::Relaxed);
                        WriterMsg::Socket(Box::new(ev))
                    }
                    Err(e) => {
                        stats.malformed.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = bad.allow() {
                            warn!(error = %e, suppressed, "eBPF record refused");
                        }
                        continue;
                    }
                };
                if tx.send_wait(msg).is_err() {
                    return;
                }
                stats.records_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        if checked.0.elapsed() >= Duration::from_secs(1) || stopping {
            // Follow clock steps (NTP) in the boot-to-wall offset.
            offset = boot_to_wall();
            let now = now_ns();
            for feed in &mut feeds {
                let total = lost_total(&feed.lost);
                if total > feed.seen {
                    let n = total - feed.seen;
                    stats.records_lost.fetch_add(n, Ordering::Relaxed);
                    let gap = WriterMsg::Gap {
                        source: "ebpf",
                        start_ns: checked.1,
                        end_ns: now,
                        lost: Some(n),
                        reason: feed.reason,
                    };
                    if tx.send_wait(gap).is_err() {
                        return;
                    }
                    feed.seen = total;
                }
            }
            checked = (Instant::now(), now);
        }
        if stopping {
            stats.programs_attached.store(0, Ordering::Relaxed);
            return;
        }
    }
}
