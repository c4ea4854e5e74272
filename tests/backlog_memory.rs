//! A stalled writer behind a producer pushing 1,000,000 synthetic events: memory stays under
//! budget, backlog warnings come at most once per interval, and every event is either stored
//! or counted as dropped. The writer is the real one, fed by this test at about 50,000
//! events/s (far behind the producer). Alone in its test binary, so the process's peak RSS is
//! what the pipeline and the writer used.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use nattrail::pipeline::flow::{Addr, Counters, EventKind, FlowEvent, IPS_SRC_NAT, Tuple};
use nattrail::pipeline::messages::WriterMsg;
use nattrail::pipeline::stage::{Overflow, Sent, StageConfig, stage};
use nattrail::store::schema::open_ro;
use nattrail::store::writer::{Writer, WriterConfig, WriterStats};
use nattrail_lab::memory::peak_rss_mib;

/// The stated budget for the whole agent process under overload.
const RSS_BUDGET_MIB: u64 = 256;
const EVENTS: u64 = 1_000_000;
const WARN_INTERVAL: Duration = Duration::from_secs(1);
/// What the stalled writer takes, in events a second.
const STALLED_RATE: f64 = 50_000.0;

/// Log lines written by the stage, kept for counting.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Event `i` of a stream of short flows: each flow's NEW, then its DESTROY. (A stream of
/// NEW events only would measure the writer's open-flow state, which grows with the flows
/// alive by design, rather than the backlog: 500,000 open flows crossed the open-flow map's
/// resize and put the process over budget on its own.)
fn synthetic(i: u64) -> FlowEvent {
    let (flow, kind) = (
        i / 2,
        if i.is_multiple_of(2) {
            EventKind::New
        } else {
            EventKind::Destroy
        },
    );
    let i = flow;
    let client = Addr::from_v4([10, 77, (i >> 8) as u8, i as u8]);
    FlowEvent {
        kind,
        family: 4,
        proto: 17,
        orig: Tuple {
            src: client,
            dst: Addr::from_v4([198, 51, 100, 2]),
            sport: (i % 60_000) as u16 + 1024,
            dport: 53,
        },
        reply: Tuple {
            src: Addr::from_v4([198, 51, 100, 2]),
            dst: Addr::from_v4([198, 51, 100, 1]),
            sport: 53,
            dport: (i % 60_000) as u16 + 1024,
        },
        ct_id: i as u32,
        zone: 0,
        mark: 0,
        status: IPS_SRC_NAT,
        tcp_state: None,
        icmp: None,
        counters_orig: Some(Counters {
            packets: 1,
            bytes: 80,
        }),
        counters_reply: None,
        start_ns: Some(1_700_000_000_000_000_000 + i * 1_000),
        stop_ns: (kind == EventKind::Destroy)
            .then_some(1_700_000_000_000_000_000 + i * 1_000 + 500),
        event_ns: None,
    }
}

#[test]
fn stalled_writer_keeps_memory_bounded_and_accounts_every_event() -> Result<()> {
    let lines = Lines::default();
    let sink = lines.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();

    let dir = std::env::temp_dir().join(format!("nattrail-backlog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let defaults = nattrail::config::Config::default();
    let wcfg = WriterConfig {
        db_path: dir.join("t.duckdb"),
        ..WriterConfig::from_config(&defaults)
    };
    let stats = Arc::new(WriterStats::default());
    let mut writer = Writer::open(&wcfg, Arc::clone(&stats))?;
    let (tx, rx, handle) = stage::<WriterMsg>(StageConfig {
        warn_interval: WARN_INTERVAL,
        ..StageConfig::new(
            "synthetic->writer",
            defaults.conntrack.channel_capacity,
            Overflow::DropNewest,
        )
    });
    // The writer takes batches of 1,000 and no more than STALLED_RATE a second.
    let writer_thread = std::thread::spawn(move || -> Result<()> {
        let start = Instant::now();
        let mut taken = 0u64;
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => m,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < 1_000 {
                match rx.try_recv() {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            taken += batch.len() as u64;
            writer.write_batch(batch)?;
            let due = Duration::from_secs_f64(taken as f64 / STALLED_RATE);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(())
    });

    let start = Instant::now();
    let dropped = AtomicUsize::new(0);
    for i in 0..EVENTS {
        let msg = WriterMsg::Flow {
            ev: synthetic(i),
            received_ns: 0,
        };
        if tx.send(msg)? == Sent::Dropped {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        // Keep the producer going for several warning intervals.
        if i % 100_000 == 99_999 {
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    let pushed_for = start.elapsed();
    drop(tx);
    writer_thread.join().expect("writer thread")?;
    handle.report();

    let snap = handle.snapshot();
    // The budget is the writer's and the stage's: read before the check below, whose
    // query (the events rebuilt from a million flow rows) is the test's own.
    let peak = peak_rss_mib();
    let stored: u64 = open_ro(&wcfg.db_path)?.query_row(
        "SELECT count(*)::UBIGINT FROM conntrack_events",
        [],
        |r| r.get(0),
    )?;
    let text = String::from_utf8(lines.0.lock().unwrap().clone())?;
    let warnings = text.lines().filter(|l| l.contains("backlog full")).count();
    println!(
        "received {} stored {stored} dropped {} throttled {} ms; peak RSS {peak} MiB; {warnings} warnings in {:.1} s",
        snap.received,
        snap.dropped,
        snap.throttled_ms,
        pushed_for.as_secs_f64()
    );

    ensure!(snap.received == EVENTS, "received {}", snap.received);
    ensure!(
        snap.dropped == dropped.load(Ordering::Relaxed) as u64,
        "stage and producer disagree on drops"
    );
    ensure!(
        snap.dropped > 0,
        "the stalled writer must have caused drops"
    );
    ensure!(
        snap.received == stored + snap.dropped,
        "received {} != stored {stored} + dropped {}",
        snap.received,
        snap.dropped
    );
    ensure!(
        peak <= RSS_BUDGET_MIB,
        "peak RSS {peak} MiB over the {RSS_BUDGET_MIB} MiB budget"
    );
    // One line per interval at most, plus the final summary.
    let allowed = (pushed_for.as_secs_f64() / WARN_INTERVAL.as_secs_f64()).ceil() as usize + 1;
    ensure!(
        warnings >= 1 && warnings <= allowed,
        "{warnings} backlog warnings in {:.1} s (at most {allowed})",
        pushed_for.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
