//! `cargo xtask bench ebpf`: TCP connect() + close() per second on loopback, without and with
//! the eBPF programs attached (all of them: process and socket programs, their reader and the
//! writer storing what they report, as the agent runs them). The phases alternate in one run,
//! five rounds each; the figure is the ratio of the medians. Target: >= 0.90. Needs root.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nattrail::config::Config;
use nattrail::ebpf::source::{EbpfSource, EbpfSourceConfig, EbpfStats};
use nattrail::pipeline::stage::{Overflow, StageConfig, stage};
use nattrail::store::writer::{Writer, WriterConfig, WriterStats};

const ROUNDS: usize = 5;
const PHASE: Duration = Duration::from_secs(2);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Closes with a reset: tens of thousands of connections in TIME_WAIT would exhaust the
/// ephemeral ports and measure the port search, not the programs.
fn close_now(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// connect() + close() to the listener for `PHASE`; returns connections per second. The
/// same thread accepts each connection at once: a listener thread left behind on two busy
/// cores overflowed its accept queue, and each dropped SYN cost a one-second retransmit.
fn connects(listener: &TcpListener) -> f64 {
    let to: SocketAddr = listener.local_addr().expect("the listener's address");
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < PHASE {
        for _ in 0..100 {
            let c = TcpStream::connect(to).expect("connect on loopback");
            let (s, _) = listener.accept().expect("accept on loopback");
            close_now(c);
            drop(s);
        }
        n += 100;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let dir = std::env::temp_dir().join(format!("nattrail-bench-ebpf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench directory");
    let config = Config::default();
    let wcfg = WriterConfig {
        db_path: dir.join("t.duckdb"),
        ..WriterConfig::from_config(&config)
    };
    let writer_stats = Arc::new(WriterStats::default());
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut records = 0u64;
    for round in 0..ROUNDS {
        without.push(connects(&listener));
        let writer = Writer::open(&wcfg, Arc::clone(&writer_stats)).expect("open the writer");
        let (tx, rx, _handle) = stage(StageConfig::new(
            "ebpf->writer",
            config.ebpf.channel_capacity,
            Overflow::Wait,
        ));
        let wc = wcfg.clone();
        let writer_thread = std::thread::spawn(move || writer.run(rx, &wc));
        let stats = Arc::new(EbpfStats::default());
        let started = EbpfSource::start(
            &EbpfSourceConfig {
                exec_program: Some(config.ebpf.exec_program.clone()),
                fork_exit: true,
                socket_cgroup: nattrail::pipeline::cgroups::v2_root(),
            },
            tx,
            Arc::clone(&stats),
        );
        if let Some((what, e)) = started.refused.first() {
            panic!("the eBPF programs did not load ({what}): {e} (run as root)");
        }
        // Past the /proc snapshot, so the phase measures the steady state.
        std::thread::sleep(Duration::from_millis(500));
        with.push(connects(&listener));
        started.source.expect("a running source").stop();
        writer_thread
            .join()
            .expect("writer thread")
            .expect("writer run");
        let s = stats.snapshot();
        records += s.socket_records;
        eprintln!(
            "round {}: without {:.0}/s, with {:.0}/s ({} socket records, {} lost)",
            round + 1,
            without[round],
            with[round],
            s.socket_records,
            s.records_lost
        );
    }
    let (w, a) = (median(without.clone()), median(with.clone()));
    println!(
        "connect()+close() on loopback, medians of {ROUNDS} alternating {}-s phases:",
        PHASE.as_secs()
    );
    println!("  without eBPF: {w:.0}/s");
    println!("  with eBPF:    {a:.0}/s ({records} socket records stored in all)");
    println!("  ratio:        {:.3} (target >= 0.90)", a / w);
    let _ = std::fs::remove_dir_all(&dir);
}
