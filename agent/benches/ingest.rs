//! `cargo xtask bench ingest`: replays conntrack datagrams captured from the lab through
//! decode alone, and through decode + filter + store (the writer's Appender into DuckDB).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nattrail::conntrack::capture_file::read_datagrams;
use nattrail::conntrack::decode::{Message, messages};
use nattrail::conntrack::event::EventKind;
use nattrail::store::writer::{Writer, WriterConfig, WriterMsg, WriterStats};

const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/conntrack-lab.bin");

fn datagrams() -> Vec<&'static [u8]> {
    read_datagrams(FIXTURE).expect("fixture is a capture file")
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let grams = datagrams();
    let per_round: usize = grams
        .iter()
        .map(|g| {
            messages(g, false)
                .filter(|m| matches!(m, Ok(Message::Flow(_))))
                .count()
        })
        .sum();
    println!(
        "fixture: {} datagrams, {} flow events ({} bytes)",
        grams.len(),
        per_round,
        FIXTURE.len()
    );

    // Decode alone, one core.
    let target = 5_000_000usize;
    let rounds = target.div_ceil(per_round);
    let mut checksum = 0u64;
    let t = Instant::now();
    for _ in 0..rounds {
        for g in &grams {
            for m in messages(g, false) {
                if let Ok(Message::Flow(ev)) = m {
                    checksum =
                        checksum.wrapping_add(u64::from(ev.ct_id) ^ u64::from(ev.reply.dport));
                }
            }
        }
    }
    let el = t.elapsed();
    let decode_rate = (rounds * per_round) as f64 / el.as_secs_f64();
    println!(
        "decode:         {:>10.0} events/s  ({} events in {:.3} s, {:.0} ns/event, checksum {checksum})",
        decode_rate,
        rounds * per_round,
        el.as_secs_f64(),
        el.as_nanos() as f64 / (rounds * per_round) as f64
    );

    // Decode + filter + store. Each replay round gets fresh conntrack ids so flows stay distinct.
    let dir = std::env::temp_dir().join(format!("nattrail-bench-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = WriterConfig {
        db_path: dir.join("bench.duckdb"),
        batch_rows: 50_000,
        commit_interval: Duration::from_secs(1),
    };
    let stats = Arc::new(WriterStats::default());
    let mut writer = Writer::open(&cfg, Arc::clone(&stats)).expect("open bench database");
    let target = 2_000_000usize;
    let rounds = target.div_ceil(per_round);
    let mut batch = Vec::with_capacity(60_000);
    let mut events = 0usize;
    let t = Instant::now();
    for round in 0..rounds {
        for g in &grams {
            for m in messages(g, false) {
                if let Ok(Message::Flow(mut ev)) = m {
                    if !ev.is_src_nat() || ev.kind == EventKind::Update {
                        continue;
                    }
                    ev.ct_id ^= (round as u32).wrapping_mul(0x9E37_79B9);
                    batch.push(WriterMsg::Flow { ev, received_ns: 0 });
                    events += 1;
                }
            }
        }
        if batch.len() >= 50_000 {
            writer.write_batch(batch.drain(..)).expect("store batch");
        }
    }
    writer.write_batch(batch.drain(..)).expect("store batch");
    let el = t.elapsed();
    let store_rate = events as f64 / el.as_secs_f64();
    let rows = stats.rows.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "decode + store: {:>10.0} events/s  ({events} events, {rows} rows in {:.3} s)",
        store_rate,
        el.as_secs_f64()
    );
    let size = std::fs::metadata(&cfg.db_path)
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "database: {:.1} MiB, {:.1} B/row; peak RSS {} MiB",
        size as f64 / 1048576.0,
        size as f64 / rows.max(1) as f64,
        peak_rss_kib() / 1024
    );
    println!("targets: decode >= 3,000,000 events/s, decode + store >= 500,000 events/s");
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}
