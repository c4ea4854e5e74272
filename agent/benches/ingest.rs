//! `cargo xtask bench ingest`: replays conntrack datagrams captured from the lab through
//! decode alone, and through decode + filter + store (the writer's appender into DuckDB).
//! Each phase runs three times and the median is the figure: the machines are shared.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nattrail::conntrack::capture_file::read_datagrams;
use nattrail::conntrack::decode::{Message, messages};
use nattrail::pipeline::flow::EventKind;
use nattrail::pipeline::messages::WriterMsg;
use nattrail::store::writer::{Writer, WriterConfig, WriterStats};
use nattrail_lab::memory::peak_rss_mib;

const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/conntrack-lab.bin");
const REPEATS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn show(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{:.0}", r))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decodes `target` events; returns events/s.
fn decode_round(grams: &[&[u8]], per_round: usize, target: usize) -> f64 {
    let rounds = target.div_ceil(per_round);
    let mut checksum = 0u64;
    let t = Instant::now();
    for _ in 0..rounds {
        for g in grams {
            for m in messages(g, false) {
                if let Ok(Message::Flow(ev)) = m {
                    checksum =
                        checksum.wrapping_add(u64::from(ev.ct_id) ^ u64::from(ev.reply.dport));
                }
            }
        }
    }
    let rate = (rounds * per_round) as f64 / t.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    rate
}

/// Decodes, filters and stores `target` events into a fresh database at `db`, committing
/// every `batch_rows` as the agent does; returns events/s, rows and the file size.
fn store_round(grams: &[&[u8]], per_round: usize, target: usize, db: &Path) -> (f64, u64, u64) {
    // The agent's default store settings, so the figure is what a default install gets;
    // NATTRAIL_BENCH_DUCKDB_MB, NATTRAIL_BENCH_DUCKDB_THREADS and NATTRAIL_BENCH_BATCH_ROWS
    // compare others.
    let defaults = WriterConfig::from_config(&nattrail::config::Config::default());
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    let cfg = WriterConfig {
        db_path: db.to_path_buf(),
        memory_limit_mb: env("NATTRAIL_BENCH_DUCKDB_MB").unwrap_or(defaults.memory_limit_mb),
        threads: env("NATTRAIL_BENCH_DUCKDB_THREADS").map_or(defaults.threads, |t: u64| t as u32),
        batch_rows: env("NATTRAIL_BENCH_BATCH_ROWS")
            .map_or(defaults.batch_rows, |b: u64| b as usize),
        ..defaults
    };
    let stats = Arc::new(WriterStats::default());
    let mut writer = Writer::open(&cfg, Arc::clone(&stats)).expect("open bench database");
    let rounds = target.div_ceil(per_round);
    let mut events = 0usize;
    let t = Instant::now();
    for round in 0..rounds {
        for g in grams {
            for m in messages(g, false) {
                if let Ok(Message::Flow(mut ev)) = m {
                    if !ev.is_src_nat() || ev.kind == EventKind::Update {
                        continue;
                    }
                    // Each replay round gets fresh conntrack ids so flows stay distinct.
                    ev.ct_id ^= (round as u32).wrapping_mul(0x9E37_79B9);
                    events += 1;
                    // One message at a time, committing every `batch_rows` rows, as the
                    // agent's writer thread does.
                    writer
                        .write(WriterMsg::Flow { ev, received_ns: 0 })
                        .expect("store event");
                }
            }
        }
    }
    writer.commit_pending().expect("commit the last rows");
    // Until checkpointed, part of the work is only deferred: count it.
    writer.checkpoint().expect("checkpoint");
    let rate = events as f64 / t.elapsed().as_secs_f64();
    drop(writer);
    let rows = stats.rows.load(std::sync::atomic::Ordering::Relaxed);
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    (rate, rows, size)
}

fn main() {
    let grams = read_datagrams(FIXTURE).expect("fixture is a capture file");
    let per_round: usize = grams
        .iter()
        .map(|g| {
            messages(g, false)
                .filter(|m| matches!(m, Ok(Message::Flow(_))))
                .count()
        })
        .sum();
    println!(
        "fixture: {} datagrams, {} flow events ({} bytes); median of {REPEATS} runs per phase",
        grams.len(),
        per_round,
        FIXTURE.len()
    );

    let decode: Vec<f64> = (0..REPEATS)
        .map(|_| decode_round(&grams, per_round, 5_000_000))
        .collect();
    let d = median(decode.clone());
    println!(
        "decode:         {d:>10.0} events/s  ({:.0} ns/event; runs: {})",
        1e9 / d,
        show(&decode)
    );

    let dir = std::env::temp_dir().join(format!("nattrail-bench-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = Vec::new();
    let (mut rows, mut size) = (0, 0);
    for i in 0..REPEATS {
        let (rate, r, s) = store_round(
            &grams,
            per_round,
            2_000_000,
            &dir.join(format!("{i}.duckdb")),
        );
        store.push(rate);
        (rows, size) = (r, s);
    }
    let s = median(store.clone());
    println!(
        "decode + store: {s:>10.0} events/s  ({rows} rows per run; runs: {})",
        show(&store)
    );
    println!(
        "database: {:.1} MiB, {:.1} B/row; peak RSS {} MiB",
        size as f64 / 1048576.0,
        size as f64 / rows.max(1) as f64,
        peak_rss_mib()
    );
    println!("targets: decode >= 3,000,000 events/s, decode + store >= 1,000,000 events/s");
    let _ = std::fs::remove_dir_all(&dir);
}
