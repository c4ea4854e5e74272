//! Loads the process programs, attaches them, and reads their ring buffer on a thread of its
//! own into the writer's stage. Reservation failures (a full ring) are counted by the
//! programs per CPU; read every second, they become capture gaps of source `ebpf`.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::RawTracePoint;
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
        /// Records read from the ring buffer (execs, forks, exits).
        records_received: Counter(Received),
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
    /// The exec program's name (the config can name another, e.g. to test a refused load).
    pub exec_program: String,
    /// Also the fork and exit programs.
    pub fork_exit: bool,
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
    /// Loads and attaches the programs and starts reading; an error names what failed.
    pub fn start(
        cfg: &EbpfSourceConfig,
        tx: StageTx<WriterMsg>,
        stats: Arc<EbpfStats>,
    ) -> Result<EbpfSource, EbpfError> {
        let btf = Btf::from_sys_fs().ok();
        let mut bpf = EbpfLoader::new().btf(btf.as_ref()).load(OBJECT)?;
        let mut wanted = vec![(cfg.exec_program.as_str(), "sched_process_exec")];
        if cfg.fork_exit {
            wanted.extend(LIFE_PROGRAMS);
        }
        for (name, tracepoint) in wanted {
            let program = |detail: String| EbpfError::Program {
                name: name.to_string(),
                detail,
            };
            let prog: &mut RawTracePoint = bpf
                .program_mut(name)
                .ok_or_else(|| program("not in the eBPF object".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| program(e.to_string()))?;
            prog.load().map_err(|e| program(e.to_string()))?;
            prog.attach(tracepoint)
                .map_err(|e| program(e.to_string()))?;
            stats.programs_attached.fetch_add(1, Ordering::Relaxed);
        }
        let program = |detail: String| EbpfError::Program {
            name: "reader".into(),
            detail,
        };
        let map = |bpf: &mut Ebpf, name: &'static str| {
            bpf.take_map(name).ok_or(EbpfError::Map {
                name,
                detail: "not in the eBPF object".into(),
            })
        };
        let ring =
            RingBuf::try_from(map(&mut bpf, "process_events")?).map_err(|e| EbpfError::Map {
                name: "process_events",
                detail: e.to_string(),
            })?;
        let lost: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map(&mut bpf, "process_lost")?)
            .map_err(|e| EbpfError::Map {
                name: "process_lost",
                detail: e.to_string(),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("ebpf".into())
                .spawn(move || read(bpf, ring, lost, tx, stats, stop))
                .map_err(|e| program(format!("starting its reader thread: {e}")))?
        };
        Ok(EbpfSource {
            stop,
            thread: Some(thread),
        })
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

/// The reader: waits on the ring's fd, drains it, and once a second turns new reservation
/// failures into a gap. `_bpf` keeps the programs attached for as long as it runs.
fn read(
    _bpf: Ebpf,
    mut ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    tx: StageTx<WriterMsg>,
    stats: Arc<EbpfStats>,
    stop: Arc<AtomicBool>,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut offset = boot_to_wall();
    // What was alive before the programs were attached (they were attached already).
    for p in super::proc_snapshot::snapshot(std::path::Path::new("/proc"), now_ns(), offset) {
        if tx.send_wait(WriterMsg::Exec(Box::new(p))).is_err() {
            return;
        }
    }
    let mut lost_seen = lost_total(&lost);
    let mut checked = (Instant::now(), now_ns());
    let mut bad = RateLimitedLog::new(Duration::from_secs(60));
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        {
            let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u16));
        }
        while let Some(item) = ring.next() {
            stats.records_received.fetch_add(1, Ordering::Relaxed);
            let msg = match decode(&item, offset) {
                Ok(Record::Exec(ev)) => Ok(WriterMsg::Exec(Box::new(ev))),
                Ok(Record::Life(ev)) => Ok(WriterMsg::Life(ev)),
                Err(e) => Err(e),
            };
            match msg {
                Ok(msg) => {
                    if tx.send_wait(msg).is_err() {
                        return;
                    }
                    stats.records_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = bad.allow() {
                        warn!(error = %e, suppressed, "eBPF record refused");
                    }
                }
            }
        }
        if checked.0.elapsed() >= Duration::from_secs(1) || stopping {
            // Follow clock steps (NTP) in the boot-to-wall offset.
            offset = boot_to_wall();
            let total = lost_total(&lost);
            let now = now_ns();
            if total > lost_seen {
                let n = total - lost_seen;
                stats.records_lost.fetch_add(n, Ordering::Relaxed);
                let gap = WriterMsg::Gap {
                    source: "ebpf",
                    start_ns: checked.1,
                    end_ns: now,
                    lost: Some(n),
                    reason: "process records lost: the eBPF ring buffer was full",
                };
                if tx.send_wait(gap).is_err() {
                    return;
                }
                lost_seen = total;
            }
            checked = (Instant::now(), now);
        }
        if stopping {
            stats.programs_attached.store(0, Ordering::Relaxed);
            return;
        }
    }
}
