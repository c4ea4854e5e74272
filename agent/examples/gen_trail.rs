//! `cargo xtask gen-trail --flows N --days D --out DB`: a synthetic trail written through the
//! agent's writer, and its ground-truth lookups in `DB.cases.jsonl`.

// `ask` (the lookup) is the bench's and the test's, not the generator's.
#[allow(dead_code)]
#[path = "../../tests/support/gen_trail.rs"]
mod gen_trail;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

/// Writes a synthetic trail.
#[derive(Parser)]
struct Args {
    /// Flows in all.
    #[arg(long, default_value_t = 1_000_000)]
    flows: u64,
    /// Days they span.
    #[arg(long, default_value_t = 1)]
    days: u32,
    /// The database to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the pseudo-random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Lookup cases at most.
    #[arg(long, default_value_t = 2_000)]
    cases: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    anyhow::ensure!(!a.out.exists(), "{} exists", a.out.display());
    let cfg = gen_trail::GenConfig {
        flows: a.flows,
        days: a.days,
        seed: a.seed,
        max_cases: a.cases,
        case_every: (a.flows / a.cases.max(1) as u64).max(1),
        ..Default::default()
    };
    let t = Instant::now();
    let (writer, stats, cases) = gen_trail::write_trail(&a.out, &cfg)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let conn = writer.database().connect()?;
    gen_trail::cover_span(&conn, writer.session_id(), cfg.start_ns, stats.end_ns)?;
    drop(conn);
    // As an agent stops: the open flows checkpointed, then everything in the data file.
    let db = writer.database();
    writer.finish()?;
    db.connect()?.execute_batch("CHECKPOINT")?;
    drop(db);
    let mut cases_path = a.out.as_os_str().to_os_string();
    cases_path.push(".cases.jsonl");
    std::fs::write(&cases_path, cases_json(&cases))?;
    let size = std::fs::metadata(&a.out)?.len();
    println!(
        "{} flows ({} events; tcp/udp/icmp {:?}; {} IPv6; {} of 12 h; {} open at the end; {} ports reused within 5 s) over {} day(s) in {:.1} s",
        stats.flows,
        stats.events,
        stats.by_proto,
        stats.v6,
        stats.long,
        stats.open_at_end,
        stats.quick_reuse,
        a.days,
        t.elapsed().as_secs_f64()
    );
    println!(
        "{}: {:.1} MiB, {:.1} B per flow; {} cases in {}",
        a.out.display(),
        size as f64 / 1048576.0,
        size as f64 / stats.flows.max(1) as f64,
        cases.len(),
        PathBuf::from(cases_path).display()
    );
    Ok(())
}

/// The cases as JSON lines (one object a line), for the bench and for tests.
fn cases_json(cases: &[gen_trail::Case]) -> String {
    let mut out = String::new();
    for c in cases {
        out.push_str(
            &serde_json::json!({
                "kind": c.kind.name(),
                "proto": c.proto,
                "public_ip": c.public.0.to_string(),
                "public_port": c.public.1,
                "at_ns": c.at_ns,
                "internal_ip": c.internal.0.to_string(),
                "internal_port": c.internal.1,
            })
            .to_string(),
        );
        out.push('\n');
    }
    out
}
