//! A generated trail of 2 M flows over two days (the same generator as `cargo xtask
//! gen-trail`, written through the agent's writer: 48 hourly partitions, an open-flow
//! checkpoint every minute of its clock) answers every ground-truth lookup exactly: sampled
//! flows, 12-hour flows at several instants, public ports reused within seconds, IPv6,
//! flows still open, and flows of the last hour (not sealed yet). Then the writer is dropped
//! without a clean stop and reopened (the open flows recovered from the checkpoint and the
//! journal), and every case is asked again; and once more read as the CLI reads the file
//! (read-only, DuckDB's built-in functions only).

#[path = "support/gen_trail.rs"]
mod gen_trail;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use gen_trail::{CaseKind, GenConfig};
use nattrail::query::coverage::KeptCoverage;
use nattrail::query::who::WhoStatus;
use nattrail::store::writer::{Writer, WriterStats};

#[test]
fn every_ground_truth_case_is_answered_exactly() -> Result<()> {
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
    let (dir, db, writer, stats, cases) = generated("gentrail", &cfg)?;
    let conn = writer.database().connect()?;
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
    let writer = reopen(&db)?;
    let conn = writer.database().connect()?;
    check(
        &conn,
        &KeptCoverage::of(writer.database()),
        &cases,
        "after a restart without a clean stop",
    )?;
    drop(conn);
    drop(writer);
    check(
        &open_as_cli(&db)?,
        &KeptCoverage::default(),
        &cases,
        "read as the CLI reads it",
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A connection to `db` as the CLI's `who` opens one: read-only, one thread, DuckDB's
/// built-in functions only.
fn open_as_cli(db: &Path) -> Result<duckdb::Connection> {
    use nattrail::store::database::{Database, OpenOptions};
    Ok(Database::open(db, OpenOptions::lookup())?.connect()?)
}

/// A trail generated with `cfg` in a new directory named after `name`, its capture session
/// covering the generated span: the directory, the file, its writer, what it wrote, the cases.
fn generated(
    name: &str,
    cfg: &GenConfig,
) -> Result<(
    PathBuf,
    PathBuf,
    Writer,
    gen_trail::GenStats,
    Vec<gen_trail::Case>,
)> {
    let dir = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = dir.join("t.duckdb");
    let (writer, stats, cases) = gen_trail::write_trail(&db, cfg)?;
    let conn = writer.database().connect()?;
    gen_trail::cover_span(&conn, writer.session_id(), cfg.start_ns, stats.end_ns)?;
    Ok((dir, db, writer, stats, cases))
}

/// The writer of `db` started again, as after a crash of the one before.
fn reopen(db: &Path) -> Result<Writer> {
    Ok(Writer::open(
        &gen_trail::writer_config(db),
        Arc::new(WriterStats::default()),
    )?)
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
        // Ends as a running agent's trail: flows ended since the last checkpoint.
        live_tail_s: 600,
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
            since: Some(at(23, 3300)),
            until: Some(at(23, 3570)),
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

/// `who` and `flows` against their definition, the view `flows` (every table, one row per
/// flow). For each probe (public `ip:port`, instant, tolerance, filters), `who` lists
/// exactly the view's flows whose interval meets the window, and its status follows from
/// their number; for each listing, `flows` lists exactly the view's flows meeting its
/// window. Probes and windows sit where the storage has seams: a millisecond before, at and
/// after flows' starts, ends and the hour ends they outlived (interim slices, sealed and
/// unsealed hours), and the trail's last minutes, where final slices came after the
/// open-flow checkpoint that still lists those flows open. Tolerances up to 30 s make
/// several flows fit. Asked as written, again after a restart without a clean stop, and
/// `who` once more as the CLI reads the file.
#[test]
fn who_and_flows_answer_as_the_flows_view_defines() -> Result<()> {
    let cfg = GenConfig {
        flows: 300_000,
        days: 2,
        publics: 1,
        ports: (10_000, 11_999),
        case_every: 1_000_000,
        max_cases: 10,
        seed: 7,
        live_tail_s: 600,
        ..Default::default()
    };
    let (dir, db, writer, stats, _) = generated("genoracle", &cfg)?;
    let conn = writer.database().connect()?;
    let span_ms = (
        (cfg.start_ns / 1_000_000) as i64,
        (stats.end_ns / 1_000_000) as i64,
    );
    // The state the probes of the last minutes are for: flows whose final slice came after
    // the checkpoint that lists them open.
    let stale: i64 = conn.query_row(
        "SELECT count(*) FROM open_flows o JOIN trail_recent r
           ON r.ct_id = o.ct_id AND r.start_ms = o.start_us // 1000 AND r.src_port = o.orig_sport
         WHERE r.flags & 1 = 1",
        [],
        |r| r.get(0),
    )?;
    ensure!(stale > 0, "no flow ended since the last checkpoint");
    let truth = oracle::Truth::read(&conn)?;
    let probes = oracle::probes(&truth, span_ms);
    let kept = KeptCoverage::of(writer.database());
    let first = oracle::check(&conn, &kept, &truth, &probes, "as written")?;
    let listings = oracle::listings(&truth, span_ms);
    let listed = oracle::check_flows(&conn, &truth, &listings, "as written")?;
    drop(conn);
    drop(writer);
    let writer = reopen(&db)?;
    let conn = writer.database().connect()?;
    let after = oracle::Truth::read(&conn)?;
    ensure!(
        after.rows == truth.rows,
        "the view lists {} flows after the restart against {} before",
        after.rows.len(),
        truth.rows.len()
    );
    // The statuses and counts follow from the view, equal to the one before: only the
    // answers can differ.
    oracle::check(
        &conn,
        &KeptCoverage::of(writer.database()),
        &truth,
        &probes,
        "after a restart without a clean stop",
    )?;
    oracle::check_flows(
        &conn,
        &truth,
        &listings,
        "after a restart without a clean stop",
    )?;
    println!(
        "{stats:?}; {stale} flows ended since the checkpoint; probes by status {first:?}; \
         {} listings, {listed} flows listed",
        listings.len()
    );
    drop(conn);
    drop(writer);
    oracle::check(
        &open_as_cli(&db)?,
        &KeptCoverage::default(),
        &truth,
        &probes,
        "read as the CLI reads it",
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The view `flows` as the definition of `who`'s answer, and probes of it.
mod oracle {
    use std::collections::{BTreeMap, HashMap};
    use std::net::IpAddr;

    use anyhow::{Result, ensure};
    use chrono::TimeZone;
    use nattrail::query::coverage::KeptCoverage;

    use super::gen_trail::Rng;
    use nattrail::query::flows::{FlowsQuery, flows};
    use nattrail::query::proto::Proto;
    use nattrail::query::who::{WhoQuery, WhoStatus, who_kept};

    /// A flow as the view lists it: internal endpoint, start and end in ms (end `None` while
    /// open), protocol number, destination.
    pub type Flow = (
        IpAddr,
        u16,
        Option<i64>,
        Option<i64>,
        u8,
        IpAddr,
        Option<u16>,
    );

    /// Every flow of the view, by public endpoint.
    pub struct Truth {
        /// Sorted, for comparing two readings.
        pub rows: Vec<((IpAddr, u16), Flow)>,
        by_public: HashMap<(IpAddr, u16), Vec<Flow>>,
    }

    impl Truth {
        pub fn read(conn: &duckdb::Connection) -> Result<Truth> {
            let mut st = conn.prepare(
                "SELECT public_ip, public_port, internal_ip, internal_port, start_ms,
                        epoch_ms(\"end\") AS end_ms, open, proto_num, dst_ip, dst_port
                 FROM flows",
            )?;
            // The view writes IPv6 as DuckDB's macro does (zeros not compressed): compared
            // as addresses.
            let ip = |r: &duckdb::Row<'_>, i: usize| {
                r.get::<_, String>(i)?.parse::<IpAddr>().map_err(|e| {
                    duckdb::Error::FromSqlConversionFailure(i, duckdb::types::Type::Text, e.into())
                })
            };
            let mut rows = Vec::new();
            let mut neither = 0;
            for r in st.query_map([], |r| {
                Ok((
                    (ip(r, 0)?, r.get::<_, u16>(1)?),
                    (
                        ip(r, 2)?,
                        r.get::<_, u16>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, u8>(7)?,
                        ip(r, 8)?,
                        r.get::<_, Option<u16>>(9)?,
                    ),
                    r.get::<_, bool>(6)?,
                ))
            })? {
                let (public, flow, open) = r?;
                // A generated flow has ended or is open; a row that is neither (only
                // interim slices) would leave the definition of its end to this test.
                neither += usize::from(flow.3.is_none() && !open);
                rows.push((public, flow));
            }
            ensure!(neither == 0, "{neither} flows neither ended nor open");
            rows.sort();
            let mut by_public: HashMap<(IpAddr, u16), Vec<Flow>> = HashMap::new();
            for (p, f) in &rows {
                by_public.entry(*p).or_default().push(*f);
            }
            Ok(Truth { rows, by_public })
        }

        /// The flows whose interval meets `[lo, hi]` (ms): started (or, start unseen,
        /// ended) by `hi`, and not ended before `lo`; those `filter` keeps.
        fn meeting(&self, public: &(IpAddr, u16), lo: i64, hi: i64, filter: &Filter) -> Vec<Flow> {
            let mut v: Vec<Flow> = self
                .by_public
                .get(public)
                .into_iter()
                .flatten()
                .filter(|f| f.2.or(f.3).is_some_and(|s| s <= hi) && f.3.is_none_or(|e| e >= lo))
                .filter(|f| {
                    filter.0.is_none_or(|p| p.numbers().contains(&f.4))
                        && filter.1.is_none_or(|ip| ip == f.5)
                        && filter.2.is_none_or(|port| Some(port) == f.6)
                })
                .map(shown)
                .collect();
            v.sort();
            v
        }
    }

    /// `who`'s filters: protocol, destination address, destination port.
    pub type Filter = (Option<Proto>, Option<IpAddr>, Option<u16>);

    /// A public endpoint, an instant and a tolerance in ms, and filters.
    pub type Probe = ((IpAddr, u16), i64, i64, Filter);

    /// Probes at the seams of one flow in 400, of every flow of the trail's last 10 minutes,
    /// and at random instants of the trail's span. One in four filters on the flow's
    /// protocol, one in four on its destination (address, port or both; a sealed slice's
    /// destination is read from its hour's dictionary).
    pub fn probes(truth: &Truth, (first, last): (i64, i64)) -> Vec<Probe> {
        const HOUR: i64 = 3_600_000;
        let mut rng = Rng(11);
        let tol = |rng: &mut Rng| [0, 0, 1_000, 30_000][rng.below(4) as usize];
        let filter = |rng: &mut Rng, f: &Flow| -> Filter {
            let proto = match f.4 {
                6 => Proto::Tcp,
                17 => Proto::Udp,
                _ => Proto::Icmp,
            };
            match rng.below(8) {
                0 | 1 => (Some(proto), None, None),
                2 => (None, Some(f.5), None),
                3 => (None, f.6.is_some().then_some(f.5), f.6),
                _ => (None, None, None),
            }
        };
        let mut out = Vec::new();
        for (i, (public, f)) in truth.rows.iter().enumerate() {
            let recent = f.3.is_none_or(|e| e >= last - 600_000);
            if i % 400 != 0 && !recent {
                continue;
            }
            let Some(s) = f.2 else { continue };
            let mut at = vec![s - 1, s, s + 1];
            match f.3 {
                Some(e) => {
                    at.extend([(s + e) / 2, e - 1, e, e + 1]);
                    // The first and last hour ends it outlived: interim slices.
                    let h = (s / HOUR + 1) * HOUR;
                    if h < e {
                        at.extend([h - 1, h, h + 1]);
                        let l = (e - 1) / HOUR * HOUR;
                        at.extend([l - 1, l, l + 1]);
                    }
                }
                None => at.extend([(s + last) / 2, last]),
            }
            for t in at.into_iter().filter(|t| (first..=last).contains(t)) {
                let (tol, filter) = (tol(&mut rng), filter(&mut rng, f));
                out.push((*public, t, tol, filter));
            }
        }
        let mut publics: Vec<&(IpAddr, u16)> = truth.by_public.keys().collect();
        publics.sort();
        for _ in 0..2_000 {
            let p = publics[rng.below(publics.len() as u64) as usize];
            let t = first + rng.below((last - first + 1) as u64) as i64;
            out.push((*p, t, tol(&mut rng), (None, None, None)));
        }
        out
    }

    /// Asks every probe; fails listing the first wrong answers. Returns the count of each
    /// status.
    pub fn check(
        conn: &duckdb::Connection,
        kept: &KeptCoverage,
        truth: &Truth,
        probes: &[Probe],
        when: &str,
    ) -> Result<BTreeMap<String, usize>> {
        let mut wrong = Vec::new();
        let mut statuses = BTreeMap::new();
        for (public, at, tol, filter) in probes {
            let q = WhoQuery {
                ip: public.0,
                port: public.1,
                at: chrono::Utc.timestamp_nanos(at * 1_000_000),
                tolerance: std::time::Duration::from_millis(*tol as u64),
                proto: filter.0,
                dst_ip: filter.1,
                dst_port: filter.2,
                live: false,
            };
            let a = who_kept(conn, &q, kept)?;
            let mut got: Vec<Flow> = a
                .matches
                .iter()
                .map(|m| {
                    Ok((
                        m.flow.internal_ip.parse()?,
                        m.flow.internal_port,
                        m.flow.start_us.map(|u| u / 1_000),
                        m.flow.end_us.map(|u| u / 1_000),
                        proto_number(&m.flow.proto)?,
                        m.flow.dst_ip.parse()?,
                        m.flow.dst_port,
                    ))
                })
                .collect::<Result<_>>()?;
            got.sort();
            let want = truth.meeting(public, at - tol, at + tol, filter);
            let status = match want.len() {
                0 => WhoStatus::None,
                1 => WhoStatus::Found,
                _ => WhoStatus::Ambiguous,
            };
            *statuses.entry(format!("{status:?}")).or_insert(0) += 1;
            if a.status != status || got != want {
                wrong.push(format!(
                    "{public:?} at {at} ± {tol} ms {filter:?}: {:?} {got:?}, want {status:?} {want:?}",
                    a.status
                ));
            }
        }
        verdict(when, "probes", probes.len(), &wrong)?;
        Ok(statuses)
    }
    /// A `flows` listing: by internal address (else by public address and port) over
    /// `[since, until]` in ms, either bound open.
    #[derive(Debug, Clone)]
    pub struct Listing {
        internal: Option<IpAddr>,
        public: Option<(IpAddr, u16)>,
        since: Option<i64>,
        until: Option<i64>,
    }

    /// Listings around one flow in 3,000 and every 50th flow of the trail's last 10 minutes:
    /// windows of a millisecond at its start and end, of two minutes around its start, across
    /// the first hour end after its start, and open on either side.
    pub fn listings(truth: &Truth, (first, last): (i64, i64)) -> Vec<Listing> {
        const HOUR: i64 = 3_600_000;
        let mut out = Vec::new();
        for (i, (public, f)) in truth.rows.iter().enumerate() {
            let recent = f.3.is_none_or(|e| e >= last - 600_000);
            if i % 3_000 != 0 && !(recent && i % 50 == 0) {
                continue;
            }
            let Some(s) = f.2 else { continue };
            let e = f.3.unwrap_or(last);
            let h = (s / HOUR + 1) * HOUR;
            let mut windows = vec![
                (Some(s), Some(s)),
                (Some(e), Some(e)),
                (Some(e + 1), Some(e + 1)),
                (Some(s - 60_000), Some(s + 60_000)),
                (Some(h - 1), Some(h + 1)),
                (Some(e - 1), None),
                (None, Some(s)),
            ];
            windows.retain(|(a, b)| {
                a.is_none_or(|a| (first..=last).contains(&a))
                    && b.is_none_or(|b| (first..=last).contains(&b))
            });
            for (k, (since, until)) in windows.into_iter().enumerate() {
                // Alternately by the client and by the public endpoint; a window open on
                // either side by the client, whose flows are few.
                let by_client = k % 2 == 0 || since.is_none() || until.is_none();
                out.push(Listing {
                    internal: by_client.then_some(f.0),
                    public: (!by_client).then_some(*public),
                    since,
                    until,
                });
            }
        }
        out
    }

    /// Runs every listing; fails listing the first wrong ones. Returns the flows listed.
    pub fn check_flows(
        conn: &duckdb::Connection,
        truth: &Truth,
        listings: &[Listing],
        when: &str,
    ) -> Result<usize> {
        let at = |ms: i64| chrono::Utc.timestamp_nanos(ms * 1_000_000);
        let mut wrong = Vec::new();
        let mut listed = 0;
        for l in listings {
            let q = FlowsQuery {
                internal_ip: l.internal,
                public_ip: l.public.map(|p| p.0),
                public_port: l.public.map(|p| p.1),
                since: l.since.map(at),
                until: l.until.map(at),
                limit: 1_000_000,
                ..Default::default()
            };
            let mut got = flows(conn, &q)?
                .into_iter()
                .map(|f| {
                    Ok((
                        (f.public_ip.parse()?, f.public_port),
                        (
                            f.internal_ip.parse()?,
                            f.internal_port,
                            f.start_us.map(|u| u / 1_000),
                            f.end_us.map(|u| u / 1_000),
                            proto_number(&f.proto)?,
                            f.dst_ip.parse()?,
                            f.dst_port,
                        ),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            got.sort();
            let (lo, hi) = (l.since.unwrap_or(i64::MIN), l.until.unwrap_or(i64::MAX));
            let want: Vec<((IpAddr, u16), Flow)> = truth
                .rows
                .iter()
                .filter(|(p, f)| {
                    l.internal.is_none_or(|ip| f.0 == ip)
                        && l.public.is_none_or(|q| *p == q)
                        && f.2.or(f.3).is_some_and(|s| s <= hi)
                        && f.3.is_none_or(|e| e >= lo)
                })
                .map(|(p, f)| (*p, shown(f)))
                .collect();
            listed += got.len();
            if got != want {
                wrong.push(format!("{l:?}: {got:?}, want {want:?}"));
            }
        }
        println!("{when}: {listed} flows listed");
        verdict(when, "listings", listings.len(), &wrong)?;
        Ok(listed)
    }

    /// Prints how many of `asked` were `wrong`, and the first 20; fails if any was.
    fn verdict(when: &str, what: &str, asked: usize, wrong: &[String]) -> Result<()> {
        println!(
            "{when}: {asked} {what}, {} wrong{}",
            wrong.len(),
            wrong
                .iter()
                .take(20)
                .map(|w| format!("\n  {w}"))
                .collect::<String>()
        );
        ensure!(
            wrong.is_empty(),
            "{when}: {} of {asked} {what} wrong",
            wrong.len()
        );
        Ok(())
    }

    /// The number of a protocol as a `FlowRow` names it.
    fn proto_number(name: &str) -> Result<u8> {
        Ok(match name {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            "icmpv6" => 58,
            other => anyhow::bail!("protocol {other:?} not generated"),
        })
    }

    /// A flow as a `FlowRow` shows it: ICMP's stored destination port (0) is no port.
    fn shown(f: &Flow) -> Flow {
        let mut f = *f;
        if matches!(f.4, 1 | 58) {
            f.6 = None;
        }
        f
    }
}
