//! A generated trail of 2 M flows over two days (the same generator as `cargo xtask
//! gen-trail`, written through the agent's writer: 48 hourly partitions, an open-flow
//! checkpoint every minute of its clock) answers every ground-truth lookup exactly: sampled
//! flows, 12-hour flows at several instants, public ports reused within seconds, IPv6,
//! flows still open, and flows of the last hour (not sealed yet). Then the writer is dropped
//! without a clean stop and reopened (the open flows recovered from the checkpoint and the
//! journal), and every case is asked again.

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
        CaseKind::Recent,
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

/// `events` reads only the hours of its window and filters the slices before numbering:
/// on a small generated trail (where the view `conntrack_events` still fits in memory, as it
/// numbers the whole trail) it gives the view's events, in the view's order, for windows
/// across hour boundaries, addresses of each side, ports, kinds, and each page of a paging.
#[test]
fn events_of_a_window_are_the_views_events() -> Result<()> {
    use nattrail::pipeline::clock::rfc3339_us;
    use nattrail::pipeline::flow::{Addr, proto_name};
    use nattrail::query::events::{EventRow, EventsQuery, events};

    let dir = std::env::temp_dir().join(format!("nattrail-genevents-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = GenConfig {
        flows: 60_000,
        days: 1,
        publics: 1,
        ports: (10_000, 11_999),
        ..Default::default()
    };
    let db = dir.join("t.duckdb");
    let (writer, stats, cases) = gen_trail::write_trail(&db, &cfg)?;
    let conn = writer.database().connect()?;
    let at = |h: i64, s: i64| {
        chrono::DateTime::from_timestamp_nanos(cfg.start_ns as i64 + (h * 3600 + s) * 1_000_000_000)
    };
    let c = &cases[cases.len() / 2];
    let queries = [
        EventsQuery::default(),
        EventsQuery {
            since: Some(at(10, -30)),
            until: Some(at(10, 30)),
            ..Default::default()
        },
        EventsQuery {
            since: Some(at(23, 3000)),
            ..Default::default()
        },
        EventsQuery {
            until: Some(at(0, 120)),
            kind: Some(2),
            ..Default::default()
        },
        EventsQuery {
            ip: Some(c.internal.0),
            ..Default::default()
        },
        EventsQuery {
            ip: Some(c.public.0),
            port: Some(c.public.1),
            since: Some(at(2, 0)),
            until: Some(at(20, 0)),
            ..Default::default()
        },
        EventsQuery {
            port: Some(443),
            kind: Some(1),
            since: Some(at(5, 0)),
            until: Some(at(6, 10)),
            ..Default::default()
        },
    ];
    let mut counts = Vec::new();
    for q in queries {
        let mut conds = Vec::new();
        if let Some(t) = q.since {
            conds.push(format!("epoch_us(ts) >= {}", t.timestamp_micros()));
        }
        if let Some(t) = q.until {
            conds.push(format!("epoch_us(ts) <= {}", t.timestamp_micros()));
        }
        if let Some(ip) = q.ip {
            let a = Addr::from(ip).0;
            conds.push(format!(
                "(orig_src = {a}::UHUGEINT OR reply_dst = {a}::UHUGEINT OR orig_dst = {a}::UHUGEINT)"
            ));
        }
        if let Some(p) = q.port {
            conds.push(format!(
                "(orig_sport = {p} OR reply_dport = {p} OR orig_dport = {p})"
            ));
        }
        if let Some(k) = q.kind {
            conds.push(format!("kind = {k}"));
        }
        let sql =
            format!(
            "SELECT epoch_us(ts) AS t, kind, proto, orig_src, orig_sport, reply_dst, reply_dport,
                    orig_dst, orig_dport, ct_id, inexact, orig_bytes, reply_bytes, ts_source
             FROM conntrack_events WHERE {} ORDER BY seq",
            if conds.is_empty() { "true".to_string() } else { conds.join(" AND ") }
        );
        let mut stmt = conn.prepare(&sql)?;
        // The view's rows as `events` reports them, numbered in the view's order.
        let mut want: Vec<EventRow> = stmt
            .query_map([], |r| {
                let kind: u8 = r.get(1)?;
                Ok(EventRow {
                    seq: 0,
                    ts: rfc3339_us(r.get(0)?),
                    ts_source: ["kernel", "receive"][r.get::<_, u8>(13)? as usize].to_string(),
                    kind: ["", "new", "destroy", "dump"][kind as usize].to_string(),
                    proto: proto_name(r.get(2)?),
                    internal_ip: Addr(r.get(3)?).to_string(),
                    internal_port: r.get(4)?,
                    public_ip: Addr(r.get(5)?).to_string(),
                    public_port: r.get(6)?,
                    dst_ip: Addr(r.get(7)?).to_string(),
                    dst_port: r.get(8)?,
                    conntrack_id: r.get(9)?,
                    inexact: r.get(10)?,
                    bytes_out: r.get(11)?,
                    bytes_in: r.get(12)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        for (i, e) in want.iter_mut().enumerate() {
            e.seq = i as u64;
        }
        // Paged in pages of 40, as a client with the cursor would (the first 400 events).
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let page = events(
                &conn,
                &EventsQuery {
                    limit: 40,
                    after_seq: cursor,
                    ..q.clone()
                },
            )?;
            got.extend(page.events);
            match page.next_cursor {
                Some(c) if got.len() < 400 => cursor = Some(c),
                _ => break,
            }
        }
        let n = got.len();
        ensure!(n > 0, "{q:?}: no events");
        ensure!(
            got[..] == want[..n] && (n == want.len() || n >= 400),
            "{q:?}: {n} events paged against the view's {}; first difference at {:?}",
            want.len(),
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        counts.push((n, want.len()));
    }
    println!("{stats:?}; events (paged, the view's): {counts:?}");
    drop(conn);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
