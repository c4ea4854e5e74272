//! `cargo xtask bench open-flows`: what the writer's open-flow state costs a CGNAT-sized table.
//!
//! Each phase runs in a process of its own, so its peak RSS is its own:
//! - `table`: the open-flow set alone, fed 2 M NEW events; bytes allocated per open flow,
//!   counted by the allocator, at every 100 k flows (the worst is right after the hash table
//!   grows) and through a table dump that lists them all;
//! - `writer`: the real writer holding 2 M open flows: journal, checkpoint, an hour's end
//!   (an interim slice per open flow, then the seal) and a clean stop; peak RSS;
//! - `restart`: the writer opened again on that file, recovering the 2 M open flows.
//!
//! Run alone, `NATTRAIL_OPEN_FLOWS_PHASE=seal NATTRAIL_BENCH_SEAL_DB=<file>` seals the unsealed
//! hours of a trail with the writer's DuckDB settings and reports time and peak RSS (for an
//! hour larger than the bench makes).
//!
//! Target: ≤ 64 B per open flow, and the writer with 2 M open flows within 256 MiB RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use nattrail::pipeline::flow::{Addr, EventKind, FlowEvent, IPS_SRC_NAT, Tuple};
use nattrail::pipeline::messages::WriterMsg;
use nattrail::store::database::Database;
use nattrail::store::reconcile::OpenFlows;
use nattrail::store::trail;
use nattrail::store::writer::{Writer, WriterConfig, WriterStats};
use nattrail_lab::memory::peak_rss_mib;

/// Counts the bytes live on the heap, so the table's cost is exact rather than read off RSS.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same layout, passed through.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same pointer and layout, passed through.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same pointer and layout, passed through.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const FLOWS: u64 = 2_000_000;
const RSS_BUDGET_MIB: u64 = 256;
const BYTES_TARGET: f64 = 64.0;
/// Events' clock at the first NEW: 40 minutes into an hour.
const T0_NS: u64 = (1_700_000_000 / 3600 * 3600 + 2400) * 1_000_000_000;

/// The NEW (or dump entry) of open flow `i`: CGNAT clients in 100.64.0.0/10 behind 16 public
/// addresses, destinations scattered; one flow in 50 is IPv6 (not translated) and one in 200
/// has its destination translated too (a port forward), which the compact table keeps apart.
fn event(i: u64, kind: EventKind) -> FlowEvent {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (family, src, dst, public) = if i % 50 == 7 {
        let v6 = |tag: u64| Addr(0x2001_0db8_u128 << 96 | u128::from(tag));
        (6, v6(i), v6(h >> 8 | 1 << 60), v6(i))
    } else {
        (
            4,
            Addr::from_v4((0x6440_0000 | (i as u32 % 30_000) << 4).to_be_bytes()),
            Addr::from_v4(((h >> 32) as u32 | 0x0100_0000).to_be_bytes()),
            Addr::from_v4([203, 0, 113, (i % 16) as u8]),
        )
    };
    let sport = 1024 + (i % 60_000) as u16;
    let dport = [443, 80, 53, 123, 8443][(h % 5) as usize];
    let pub_port = 1024 + ((i / 16) % 64_000) as u16;
    let dnat = i % 200 == 3;
    FlowEvent {
        kind,
        family,
        proto: if h & 1 == 0 { 6 } else { 17 },
        orig: Tuple {
            src,
            dst,
            sport,
            dport,
        },
        reply: Tuple {
            src: if dnat {
                Addr::from_v4([192, 168, 9, 9])
            } else {
                dst
            },
            dst: public,
            sport: if dnat { 8080 } else { dport },
            dport: if family == 6 { sport } else { pub_port },
        },
        ct_id: h as u32 ^ i as u32,
        zone: 0,
        mark: 0,
        status: IPS_SRC_NAT,
        tcp_state: None,
        icmp: None,
        counters_orig: None,
        counters_reply: None,
        // Spread over 10 minutes of the events' clock.
        start_ns: Some(T0_NS + i * 300_000),
        stop_ns: None,
        event_ns: Some(T0_NS + i * 300_000),
    }
}

fn table() {
    let base = LIVE.load(Ordering::Relaxed);
    let mut flows = OpenFlows::default();
    let mut worst = (0.0f64, 0u64);
    for i in 0..FLOWS {
        flows.on_event(&event(i, EventKind::New), 0);
        if (i + 1) % 100_000 == 0 {
            let per = (LIVE.load(Ordering::Relaxed) - base) as f64 / (i + 1) as f64;
            if per > worst.0 {
                worst = (per, i + 1);
            }
        }
    }
    let held = LIVE.load(Ordering::Relaxed) - base;
    // A dump that lists every open flow: what it costs on top while it runs.
    flows.dump_begin();
    let mut dump_peak = 0;
    for i in 0..FLOWS {
        flows.on_event(&event(i, EventKind::Dump), 0);
        dump_peak = dump_peak.max(LIVE.load(Ordering::Relaxed) - base);
    }
    let closed = flows.dump_end(T0_NS + 3_600_000_000_000, None).len();
    assert_eq!(closed, 0, "a dump listing every flow closes none");
    assert_eq!(flows.len() as u64, FLOWS);
    println!(
        "table: {} open flows hold {:.1} MiB = {:.1} B per open flow; worst {:.1} B at {} flows; \
         during a full dump {:.1} B; target <= {BYTES_TARGET} B",
        FLOWS,
        held as f64 / 1048576.0,
        held as f64 / FLOWS as f64,
        worst.0,
        worst.1,
        dump_peak as f64 / FLOWS as f64,
    );
    println!(
        "RESULT table_bytes={:.1} worst_bytes={:.1} dump_bytes={:.1}",
        held as f64 / FLOWS as f64,
        worst.0,
        dump_peak as f64 / FLOWS as f64
    );
}

/// The agent's default writer settings; NATTRAIL_BENCH_DUCKDB_MB overrides DuckDB's limit,
/// NATTRAIL_BENCH_DUCKDB_THREADS its threads.
fn writer_config(db: &Path) -> WriterConfig {
    let defaults = WriterConfig::from_config(&nattrail::config::Config::default());
    WriterConfig {
        db_path: db.to_path_buf(),
        memory_limit_mb: std::env::var("NATTRAIL_BENCH_DUCKDB_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.memory_limit_mb),
        threads: std::env::var("NATTRAIL_BENCH_DUCKDB_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.threads),
        ..defaults
    }
}

/// Resident set size now, in MiB.
fn rss_now_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// With NATTRAIL_BENCH_MEMORY set: DuckDB's own account of its memory, by tag.
fn memory(w: &Writer, when: &str) {
    if std::env::var_os("NATTRAIL_BENCH_MEMORY").is_none() {
        return;
    }
    let conn = w.database().connect().expect("connection");
    let mut st = conn
        .prepare(
            "SELECT tag, memory_usage_bytes // 1048576 FROM duckdb_memory() \
             WHERE memory_usage_bytes > 1048576 ORDER BY 2 DESC",
        )
        .expect("duckdb_memory");
    let tags: Vec<String> = st
        .query_map([], |r| {
            Ok(format!(
                "{} {}",
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?
            ))
        })
        .expect("duckdb_memory")
        .map(|r| r.expect("row"))
        .collect();
    let rss = rss_now_mib();
    println!(
        "duckdb memory ({when}, MiB): {}; RSS now {rss} MiB, peak {} MiB",
        tags.join(", "),
        peak_rss_mib()
    );
}

fn writer(db: &Path) {
    let cfg = writer_config(db);
    let stats = Arc::new(WriterStats::default());
    let mut w = Writer::open(&cfg, Arc::clone(&stats)).expect("opening the bench database");
    memory(&w, "opened");
    let t = Instant::now();
    let mut batch = Vec::with_capacity(1_000);
    for i in 0..FLOWS {
        batch.push(WriterMsg::Flow {
            ev: event(i, EventKind::New),
            received_ns: 0,
        });
        if batch.len() == 1_000 {
            w.write_batch(batch.drain(..)).expect("writing");
        }
        if i % 500_000 == 499_999 {
            memory(&w, &format!("{} fed", i + 1));
        }
    }
    let fed = t.elapsed();
    let peak_fed = peak_rss_mib();
    memory(&w, "fed");
    // Past the hour's end and its seal: every open flow gets an interim slice.
    let later = FLOWS + 1;
    let mut ev = event(later, EventKind::New);
    ev.start_ns = Some(T0_NS + 1_800_000_000_000);
    ev.event_ns = ev.start_ns;
    w.write_batch([WriterMsg::Flow { ev, received_ns: 0 }])
        .expect("crossing the hour");
    let open = stats.open_flows.load(Ordering::Relaxed);
    let sealed = stats.slices_sealed.load(Ordering::Relaxed);
    let peak_hour = peak_rss_mib();
    memory(&w, "past the hour");
    w.finish().expect("clean stop");
    let peak = peak_rss_mib();
    println!(
        "writer: {open} open flows fed in {:.1} s, {sealed} slices sealed at the hour's end; \
         peak RSS {peak_fed} MiB once fed, {peak_hour} MiB past the hour, {peak} MiB after \
         the clean stop (budget {RSS_BUDGET_MIB} MiB); RSS after the stop {} MiB",
        fed.as_secs_f64(),
        rss_now_mib()
    );
    println!("RESULT writer_rss={peak} open={open}");
}

fn restart(db: &Path) {
    let cfg = writer_config(db);
    let stats = Arc::new(WriterStats::default());
    let t = Instant::now();
    let w = Writer::open(&cfg, Arc::clone(&stats)).expect("reopening the bench database");
    let took = t.elapsed();
    let open = stats.open_flows.load(Ordering::Relaxed);
    memory(&w, "recovered");
    drop(w);
    let peak = peak_rss_mib();
    println!(
        "restart: {open} open flows recovered in {:.2} s; peak RSS {peak} MiB",
        took.as_secs_f64()
    );
    println!("RESULT restart_rss={peak} open={open}");
}

/// Seals every unsealed hour of `db` (in a transaction rolled back after, so the file can be
/// sealed again): how long and how much memory an hour of that size takes.
fn seal(db: &Path) {
    let cfg = writer_config(db);
    let db = Database::open(db, cfg.open_options()).expect("opening the trail to seal");
    let conn = db.connect().expect("connection");
    let (slices, hour): (i64, Option<i32>) = conn
        .query_row("SELECT count(*), max(hour) FROM trail_recent", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("counting the unsealed slices");
    let hour = hour.expect("the trail has unsealed slices");
    let t = Instant::now();
    conn.execute_batch("BEGIN TRANSACTION").expect("begin");
    let sealed = trail::seal_in_transaction(&conn, hour);
    let took = t.elapsed();
    conn.execute_batch("ROLLBACK").expect("rollback");
    println!(
        "seal: {slices} slices up to hour {hour} at {} MiB, {} thread(s): {} in {:.1} s; peak RSS {} MiB",
        cfg.memory_limit_mb,
        cfg.threads,
        match sealed {
            Ok(n) => format!("{n} sealed"),
            Err(e) => format!("FAILED ({e})"),
        },
        took.as_secs_f64(),
        peak_rss_mib()
    );
}

fn main() {
    if let Ok("seal") = std::env::var("NATTRAIL_OPEN_FLOWS_PHASE").as_deref() {
        let db = std::env::var_os("NATTRAIL_BENCH_SEAL_DB").expect("NATTRAIL_BENCH_SEAL_DB");
        return seal(Path::new(&db));
    }
    let dir = std::env::var_os("NATTRAIL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/nattrail-bench"));
    let db = dir.join("open-flows.duckdb");
    match std::env::var("NATTRAIL_OPEN_FLOWS_PHASE").as_deref() {
        Ok("table") => return table(),
        Ok("writer") => return writer(&db),
        Ok("restart") => return restart(&db),
        _ => {}
    }
    std::fs::create_dir_all(&dir).expect("bench directory");
    for f in ["open-flows.duckdb", "open-flows.duckdb.wal"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let exe = std::env::current_exe().expect("own path");
    let mut results = Vec::new();
    for phase in ["table", "writer", "restart"] {
        let out = Command::new(&exe)
            .env("NATTRAIL_OPEN_FLOWS_PHASE", phase)
            .output()
            .expect("running a phase");
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines().filter(|l| !l.starts_with("RESULT ")) {
            println!("{l}");
        }
        assert!(
            out.status.success(),
            "phase {phase} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        results.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("RESULT "))
                .flat_map(|l| l.split(' '))
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse::<f64>().unwrap_or(f64::NAN))),
        );
    }
    let get = |k: &str| results.iter().find(|r| r.0 == k).map_or(f64::NAN, |r| r.1);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "open-flows: {:.1} B per open flow (worst {:.1}) vs target {BYTES_TARGET}: {}; \
         writer with {} open flows {} MiB vs {RSS_BUDGET_MIB}: {}; restart {} MiB",
        get("table_bytes"),
        get("worst_bytes"),
        verdict(get("worst_bytes") <= BYTES_TARGET),
        get("open"),
        get("writer_rss"),
        verdict(get("writer_rss") <= RSS_BUDGET_MIB as f64),
        get("restart_rss"),
    );
}
