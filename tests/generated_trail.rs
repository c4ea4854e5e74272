//! A generated trail of 2 M flows over two days (the same generator as `cargo xtask
//! gen-trail`, written through the agent's writer: 48 hourly partitions, an open-flow
//! checkpoint every minute of its clock) answers every ground-truth lookup exactly: sampled
//! flows, 12-hour flows at several instants, public ports reused within seconds, IPv6, and
//! flows still open. Then the writer is dropped without a clean stop and reopened (the open
//! flows recovered from the checkpoint and the journal), and every case is asked again.

#[path = "support/gen_trail.rs"]
mod gen_trail;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use gen_trail::{CaseKind, GenConfig};
use nattrail::query::coverage::KeptCoverage;
use nattrail::query::who::WhoStatus;
use nattrail::store::writer::{Writer, WriterStats};

#[test]
fn every_ground_truth_case_is_answered_exactly() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("nattrail-gentrail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // One public address with an 8,000-port block: crowded, so ports are reused within
    // seconds, as on a CGNAT.
    let cfg = GenConfig {
        flows: 2_000_000,
        days: 2,
        publics: 1,
        ports: (10_000, 17_999),
        case_every: 4_000,
        max_cases: 1_000,
        ..Default::default()
    };
    let db = dir.join("t.duckdb");
    let (writer, stats, cases) = gen_trail::write_trail(&db, &cfg)?;
    let conn = writer.database().connect()?;
    gen_trail::cover_span(&conn, writer.session_id(), cfg.start_ns, stats.end_ns)?;
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &cases {
        *kinds.entry(c.kind.name()).or_default() += 1;
    }
    println!("{stats:?}; cases {kinds:?}");
    for k in [
        CaseKind::Sampled,
        CaseKind::Long,
        CaseKind::ReusedBefore,
        CaseKind::ReusedAfter,
        CaseKind::V6,
    ] {
        ensure!(
            kinds.get(k.name()).is_some_and(|n| *n > 0),
            "no {} case",
            k.name()
        );
    }
    let sealed: i64 = conn.query_row("SELECT count(DISTINCT hour) FROM flow_sealed", [], |r| {
        r.get(0)
    })?;
    ensure!(sealed >= 47, "only {sealed} hours sealed");
    // Two days of hours: two days' tables (a third when the last hours pass midnight).
    let days = nattrail::store::days::list(&conn)?;
    ensure!((2..=3).contains(&days.len()), "days with tables: {days:?}");
    check(
        &conn,
        &KeptCoverage::of(writer.database()),
        &cases,
        "as written",
    )?;
    drop(conn);
    // A crash: no clean stop, no last checkpoint. The open flows come back from the
    // checkpoint and the journal written since.
    drop(writer);
    let writer = Writer::open(
        &gen_trail::writer_config(&db),
        Arc::new(WriterStats::default()),
    )?;
    let conn = writer.database().connect()?;
    check(
        &conn,
        &KeptCoverage::of(writer.database()),
        &cases,
        "after a restart without a clean stop",
    )?;
    drop(conn);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Asks every case; fails listing the wrong answers.
fn check(
    conn: &duckdb::Connection,
    kept: &KeptCoverage,
    cases: &[gen_trail::Case],
    when: &str,
) -> Result<()> {
    let mut wrong = Vec::new();
    let t = Instant::now();
    for c in cases {
        let (status, got, ends) = gen_trail::ask(conn, kept, c.public, c.at_ns)?;
        let want = (c.internal.0.to_string(), c.internal.1);
        // Stored ends are rounded up to the millisecond. A 12-hour flow asked in its middle
        // is found by an interim slice: its end comes from the hours after.
        let end = c.end_ns.map(|e| e.div_ceil(1_000_000) as i64 * 1_000);
        if status != WhoStatus::Found || got != [want.clone()] || ends != [end] {
            wrong.push(format!(
                "{c:?}: {status:?} {got:?} ending {ends:?}, want {want:?} ending {end:?}"
            ));
        }
    }
    println!(
        "{when}: {} cases in {:.1} s; {} wrong",
        cases.len(),
        t.elapsed().as_secs_f64(),
        wrong.len()
    );
    ensure!(wrong.is_empty(), "{when}: {}", wrong.join("\n"));
    Ok(())
}
