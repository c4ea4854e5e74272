//! "Which internal client owned public IP:port at time T?"

use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat, Utc};
use duckdb::Connection;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::coverage::{Coverage, Hole, KeptCoverage};
use super::flows::{Endpoint, FlowRow, covering};
use super::proto::Proto;
use super::{QueryError, in_snapshot};

/// A forensic lookup.
#[derive(Debug, Clone)]
pub struct WhoQuery {
    /// Public (translated) address from the report.
    pub ip: IpAddr,
    /// Public port (or ICMP id) from the report.
    pub port: u16,
    /// Instant from the report.
    pub at: DateTime<Utc>,
    /// How far the report's clock may be off.
    pub tolerance: std::time::Duration,
    /// Restrict to one protocol.
    pub proto: Option<Proto>,
    /// Restrict to one destination address.
    pub dst_ip: Option<IpAddr>,
    /// Restrict to one destination port.
    pub dst_port: Option<u16>,
    /// A running agent is writing this trail: its open session covers up to now.
    pub live: bool,
}

/// How sure the answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhoStatus {
    /// Exactly one flow fits the window.
    Found,
    /// Several flows fit; all are listed, best first.
    Ambiguous,
    /// No flow fits, and the trail covered the instant.
    None,
    /// The trail did not cover the instant (a capture gap, or no agent running): whatever
    /// the matches say, a flow may be missing.
    Incomplete,
}

/// One candidate flow and how well it fits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WhoMatch {
    /// The flow.
    #[serde(flatten)]
    pub flow: FlowRow,
    /// The flow's interval contains the instant asked.
    pub covers: bool,
    /// Seconds between the instant asked and the interval (0 when it covers it).
    pub distance_s: f64,
}

/// The whole answer, as printed by `who --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoAnswer {
    /// found, ambiguous or none.
    pub status: WhoStatus,
    /// The instant asked, RFC 3339 UTC.
    pub at: String,
    /// The tolerance in seconds.
    pub tolerance_s: f64,
    /// Candidates, best first.
    pub matches: Vec<WhoMatch>,
    /// Holes in the trail overlapping the window; any hole containing the instant makes the
    /// status "incomplete".
    pub holes: Vec<Hole>,
}

/// Runs the lookup: the hours around the instant (never the whole history), pruned to the
/// public address and port, plus the flows open in the trail.
pub fn who(conn: &Connection, q: &WhoQuery) -> Result<WhoAnswer, QueryError> {
    who_kept(conn, q, &KeptCoverage::default())
}

/// `who`, with the trail's coverage kept between lookups while its writer changes nothing.
pub fn who_kept(
    conn: &Connection,
    q: &WhoQuery,
    kept: &KeptCoverage,
) -> Result<WhoAnswer, QueryError> {
    // Counted before the snapshot is taken (at its first statement): the same even count
    // after it proves that no change was made or under way meanwhile, so the snapshot holds
    // the coverage kept at that count.
    let before = kept.count();
    in_snapshot(conn, |conn| {
        if let Some(cov) = kept.at(before) {
            let ans = answer(conn, q, &cov)?;
            if kept.count() == before {
                return Ok(ans);
            }
        }
        let cov = Arc::new(Coverage::read(conn)?.with_gaps(conn)?);
        if kept.count() == before {
            kept.keep(before, Arc::clone(&cov));
        }
        answer(conn, q, &cov)
    })
}

fn answer(conn: &Connection, q: &WhoQuery, cov: &Coverage) -> Result<WhoAnswer, QueryError> {
    let at_us = q.at.timestamp_micros();
    let tol_us = q.tolerance.as_micros() as i64;
    let (lo, hi) = (at_us - tol_us, at_us + tol_us);
    // Stored starts are rounded down and ends up to the millisecond.
    let (lo_ms, hi_ms) = (
        lo.div_euclid(1_000) + i64::from(lo.rem_euclid(1_000) > 0),
        hi.div_euclid(1_000),
    );
    let ep = Endpoint {
        ip: q.ip,
        port: q.port,
        proto: q.proto,
        dst_ip: q.dst_ip,
        dst_port: q.dst_port,
    };
    let flows = covering(conn, cov, &ep, lo_ms, hi_ms)?;
    let mut matches: Vec<WhoMatch> = flows
        .into_iter()
        .map(|flow| {
            let covers =
                flow.start_us.is_none_or(|s| s <= at_us) && flow.end_us.is_none_or(|e| e >= at_us);
            let before = flow
                .start_us
                .map(|s| s - at_us)
                .filter(|d| *d > 0)
                .unwrap_or(0);
            let after = flow
                .end_us
                .map(|e| at_us - e)
                .filter(|d| *d > 0)
                .unwrap_or(0);
            WhoMatch {
                flow,
                covers,
                distance_s: before.max(after) as f64 / 1e6,
            }
        })
        .collect();
    // Best first: intervals that contain T, then the nearest; among equals, the later start.
    matches.sort_by(|a, b| {
        b.covers
            .cmp(&a.covers)
            .then(a.distance_s.total_cmp(&b.distance_s))
            .then(b.flow.start_us.cmp(&a.flow.start_us))
    });
    let holes = cov.holes(conn, lo, hi, q.live)?;
    let status = match matches.len() {
        _ if holes.iter().any(|h| h.contains(at_us)) => WhoStatus::Incomplete,
        0 => WhoStatus::None,
        1 => WhoStatus::Found,
        _ => WhoStatus::Ambiguous,
    };
    Ok(WhoAnswer {
        status,
        at: q.at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        tolerance_s: q.tolerance.as_secs_f64(),
        matches,
        holes,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::pipeline::flow::{Addr, Counters, EventKind, FlowEvent, IPS_SRC_NAT, Tuple};
    use crate::pipeline::messages::WriterMsg;
    use crate::query::coverage::HoleKind;
    use crate::store::writer::{Writer, WriterConfig, WriterStats};

    const T0: u64 = 1_700_000_000_000_000_000;
    const SEC: u64 = 1_000_000_000;

    fn ip(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    fn ev(
        kind: EventKind,
        id: u32,
        client: &str,
        cport: u16,
        pport: u16,
        start: u64,
        stop: Option<u64>,
    ) -> FlowEvent {
        FlowEvent {
            kind,
            family: 4,
            proto: 6,
            orig: Tuple {
                src: ip(client),
                dst: ip("198.51.100.2"),
                sport: cport,
                dport: 443,
            },
            reply: Tuple {
                src: ip("198.51.100.2"),
                dst: ip("198.51.100.1"),
                sport: 443,
                dport: pport,
            },
            ct_id: id,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT,
            tcp_state: None,
            icmp: None,
            counters_orig: stop.map(|_| Counters {
                packets: 5,
                bytes: 500,
            }),
            counters_reply: stop.map(|_| Counters {
                packets: 4,
                bytes: 900,
            }),
            start_ns: Some(start),
            stop_ns: stop,
            event_ns: if kind == EventKind::New {
                Some(start)
            } else {
                stop
            },
        }
    }

    struct Db {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
    }

    impl Db {
        fn new(name: &str, msgs: Vec<WriterMsg>) -> Db {
            Db::batches(name, vec![msgs])
        }

        /// The trail of `batches`, each written and committed in turn.
        fn batches(name: &str, batches: Vec<Vec<WriterMsg>>) -> Db {
            let dir =
                std::env::temp_dir().join(format!("nattrail-who-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let path = dir.join("t.duckdb");
            let cfg = WriterConfig {
                db_path: path.clone(),
                ..WriterConfig::from_config(&crate::config::Config::default())
            };
            let mut w = Writer::open(&cfg, Arc::new(WriterStats::default())).unwrap();
            for msgs in batches {
                w.write_batch(msgs).unwrap();
            }
            drop(w);
            // The synthetic flows are in the past: let the capture session cover them.
            let db = crate::store::database::Database::open_rw(&path).unwrap();
            db.connect()
                .unwrap()
                .execute(
                    "UPDATE capture_sessions SET started = make_timestamp(?)",
                    [(T0 / 1_000 - 3_600_000_000) as i64],
                )
                .unwrap();
            drop(db);
            Db { dir, path }
        }

        /// Asks as the CLI does: read-only, DuckDB's built-in functions only.
        fn who(&self, port: u16, at_ns: u64, tol_s: u64) -> WhoAnswer {
            use crate::store::database::{Database, OpenOptions};
            let opts = OpenOptions::lookup();
            let conn = Database::open(&self.path, opts).unwrap().connect().unwrap();
            who(
                &conn,
                &WhoQuery {
                    ip: "198.51.100.1".parse().unwrap(),
                    port,
                    at: DateTime::from_timestamp_nanos(at_ns as i64),
                    tolerance: Duration::from_secs(tol_s),
                    proto: None,
                    live: false,
                    dst_ip: None,
                    dst_port: None,
                },
            )
            .unwrap()
        }
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn flow(e: FlowEvent) -> WriterMsg {
        WriterMsg::Flow {
            ev: e,
            received_ns: 0,
        }
    }

    /// Port 40001 used by .10 for [0,10 s], then by .11 for [12 s, 20 s]; .12 still open on 40002.
    fn reuse_db(name: &str) -> Db {
        Db::new(
            name,
            vec![
                flow(ev(EventKind::New, 1, "10.77.0.10", 5000, 40001, T0, None)),
                flow(ev(
                    EventKind::New,
                    3,
                    "10.77.0.12",
                    5002,
                    40002,
                    T0 + SEC,
                    None,
                )),
                flow(ev(
                    EventKind::Destroy,
                    1,
                    "10.77.0.10",
                    5000,
                    40001,
                    T0,
                    Some(T0 + 10 * SEC),
                )),
                flow(ev(
                    EventKind::New,
                    2,
                    "10.77.0.11",
                    5001,
                    40001,
                    T0 + 12 * SEC,
                    None,
                )),
                flow(ev(
                    EventKind::Destroy,
                    2,
                    "10.77.0.11",
                    5001,
                    40001,
                    T0 + 12 * SEC,
                    Some(T0 + 20 * SEC),
                )),
            ],
        )
    }

    /// `flows` of the public address 198.51.100.1 alive in `[since, until]` (ns).
    fn flows_between(conn: &Connection, since: u64, until: u64) -> Vec<FlowRow> {
        let ts = |ns: u64| Some(DateTime::from_timestamp_nanos(ns as i64));
        crate::query::flows::flows(
            conn,
            &crate::query::flows::FlowsQuery {
                public_ip: Some("198.51.100.1".parse().unwrap()),
                since: ts(since),
                until: ts(until),
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// The hours' mark of missing slices, as a lookup reads it.
    fn late_hour(db: &Db) -> Option<i32> {
        let conn = crate::store::schema::open_ro(&db.path).unwrap();
        crate::store::trail::state(&conn).unwrap().late_hour
    }

    #[test]
    fn late_flows_and_slices_of_a_sealed_hour_are_found_in_it() {
        // Flow 3 arrives (a late NEW, or found by a dump with its kernel start) with a start in
        // an hour the writer has already swept and sealed: that hour has no slice of it until
        // the next sweep, so the lookup must read the open flows there.
        let hour = 3_600 * SEC;
        let first = (T0 / 1_000_000 / 3_600_000) as i32;
        let old = |id, port, at| {
            flow(ev(
                EventKind::New,
                id,
                "10.77.1.1",
                6000 + id as u16,
                port,
                at,
                None,
            ))
        };
        // And flow 6's DESTROY (its NEW never seen) ends it in that hour: a late final slice.
        let gone = || {
            flow(ev(
                EventKind::Destroy,
                6,
                "10.77.1.1",
                6006,
                41006,
                T0 + 100 * SEC,
                Some(T0 + 200 * SEC),
            ))
        };
        let db = Db::batches(
            "late-open",
            vec![
                vec![old(1, 41001, T0), old(2, 41002, T0 + 3 * hour)],
                vec![old(3, 41003, T0 + 600 * SEC)],
            ],
        );
        assert_eq!(late_hour(&db), Some(first), "the sealed hour is marked");
        let a = db.who(41003, T0 + 1_200 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        assert_eq!(a.matches[0].flow.internal_port, 6003);
        assert!(a.matches[0].flow.open);
        let db = Db::batches(
            "late-destroy",
            vec![
                vec![old(1, 41001, T0), old(2, 41002, T0 + 3 * hour)],
                vec![gone()],
            ],
        );
        assert_eq!(late_hour(&db), Some(first), "the sealed hour is marked");
        let a = db.who(41006, T0 + 150 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        assert_eq!(
            a.matches[0].flow.end_us,
            Some(((T0 + 200 * SEC) / 1_000_000 * 1_000) as i64)
        );

        // The next hour's sweep writes its interim slices, the seal after it sorts them in and
        // clears the mark: found in the sealed hours alone.
        let db = Db::batches(
            "late-open-swept",
            vec![
                vec![old(1, 41001, T0), old(2, 41002, T0 + 3 * hour)],
                vec![old(3, 41003, T0 + 600 * SEC), gone()],
                vec![old(4, 41004, T0 + 5 * hour)],
            ],
        );
        assert_eq!(late_hour(&db), None);
        for (port, at) in [(41003, T0 + 1_200 * SEC), (41006, T0 + 150 * SEC)] {
            let a = db.who(port, at, 0);
            assert_eq!(a.status, WhoStatus::Found, "{a:?}");
            assert_eq!(a.matches[0].flow.internal_port, port - 35_000);
        }
    }

    #[test]
    fn a_trail_of_schema_10_is_read_as_it_is() {
        // The CLI reads a trail it does not migrate (a copy from an older agent): that schema
        // has no late-hour mark, so a lookup there reads the open flows of sealed hours too.
        use duckdb::types::Value;
        let dir = std::env::temp_dir().join(format!("nattrail-who-v10-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.duckdb");
        let c = crate::store::schema::database_at_version(&path, 10);
        let hour = (T0 / 1_000_000 / 3_600_000) as i64;
        c.execute("UPDATE trail_state SET sealed_hour = ?", [hour + 5])
            .unwrap();
        c.execute(
            "INSERT INTO capture_sessions VALUES (1, make_timestamp(?), NULL, now()::TIMESTAMP, 'gw', 'old')",
            [(T0 / 1_000) as i64 - 3_600_000_000],
        )
        .unwrap();
        let a = |s: &str| Value::UHugeInt(ip(s).0);
        c.execute(
            "INSERT INTO open_flows (ct_id, zone, proto, orig_src, orig_dst, orig_sport,
                 orig_dport, reply_src, reply_dst, reply_sport, reply_dport, family, start_us,
                 by_dump)
             VALUES (7, 0, 6, ?, ?, 6010, 443, ?, ?, 443, 41010, 4, ?, false)",
            duckdb::params_from_iter([
                a("10.77.2.2"),
                a("198.51.100.2"),
                a("198.51.100.2"),
                a("198.51.100.1"),
                Value::BigInt((T0 / 1_000) as i64),
            ]),
        )
        .unwrap();
        drop(c);
        let db = Db {
            dir: dir.clone(),
            path,
        };
        let ans = db.who(41010, T0 + 10 * SEC, 0);
        assert_eq!(ans.status, WhoStatus::Found, "{ans:?}");
        assert_eq!(
            (
                ans.matches[0].flow.internal_ip.as_str(),
                ans.matches[0].flow.open
            ),
            ("10.77.2.2", true)
        );
    }

    #[test]
    fn inside_one_flow_is_found_with_counters() {
        let db = reuse_db("found");
        let a = db.who(40001, T0 + 5 * SEC, 1);
        assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        let f = &a.matches[0].flow;
        assert_eq!(
            (f.internal_ip.as_str(), f.internal_port),
            ("10.77.0.10", 5000)
        );
        assert_eq!((f.bytes_out, f.packets_in), (Some(500), Some(4)));
        assert!(a.matches[0].covers && f.end.is_some());
    }

    #[test]
    fn between_two_uses_within_tolerance_is_ambiguous_and_ranked() {
        let db = reuse_db("ambiguous");
        // 10.5 s: 0.5 s after the first use ended, 1.5 s before the second began.
        let a = db.who(40001, T0 + 10 * SEC + SEC / 2, 2);
        assert_eq!(a.status, WhoStatus::Ambiguous, "{a:?}");
        assert_eq!(a.matches.len(), 2);
        assert_eq!(a.matches[0].flow.internal_ip, "10.77.0.10", "nearest first");
        assert!((a.matches[0].distance_s - 0.5).abs() < 1e-6);
        assert!((a.matches[1].distance_s - 1.5).abs() < 1e-6);
        // Outside both tolerances: nothing.
        assert_eq!(db.who(40001, T0 + 30 * SEC, 2).status, WhoStatus::None);
        // Tolerance 0 inside the second use: only it.
        let b = db.who(40001, T0 + 15 * SEC, 0);
        assert_eq!(b.status, WhoStatus::Found);
        assert_eq!(b.matches[0].flow.internal_ip, "10.77.0.11");
    }

    #[test]
    fn a_kept_coverage_is_read_again_once_the_writer_seals_or_records_a_gap() {
        let dir = std::env::temp_dir().join(format!("nattrail-who-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = WriterConfig {
            db_path: dir.join("t.duckdb"),
            ..WriterConfig::from_config(&crate::config::Config::default())
        };
        let mut w = Writer::open(&cfg, Arc::new(WriterStats::default())).unwrap();
        let db = w.database();
        let conn = db.connect().unwrap();
        // The synthetic flows are in the past: let the capture session cover them.
        conn.execute(
            "UPDATE capture_sessions SET started = make_timestamp(?)",
            [(T0 / 1_000 - 3_600_000_000) as i64],
        )
        .unwrap();
        let (start, end) = (T0 + 10 * SEC, T0 + 20 * SEC);
        w.write_batch([
            flow(ev(
                EventKind::New,
                1,
                "10.77.0.40",
                5000,
                41200,
                start,
                None,
            )),
            flow(ev(
                EventKind::Destroy,
                1,
                "10.77.0.40",
                5000,
                41200,
                start,
                Some(end),
            )),
        ])
        .unwrap();
        let kept = KeptCoverage::of(Arc::clone(&db));
        let ask = || {
            let q = WhoQuery {
                ip: "198.51.100.1".parse().unwrap(),
                port: 41200,
                at: DateTime::from_timestamp_nanos((T0 + 15 * SEC) as i64),
                tolerance: Duration::ZERO,
                proto: None,
                live: false,
                dst_ip: None,
                dst_port: None,
            };
            who_kept(&conn, &q, &kept).unwrap()
        };
        let sealed = || -> Option<i32> {
            conn.query_row("SELECT sealed_hour FROM trail_state", [], |r| r.get(0))
                .unwrap()
        };
        // Unsealed: found in trail_recent; the coverage read is kept at the count now.
        let a = ask();
        assert_eq!((a.status, a.matches.len()), (WhoStatus::Found, 1), "{a:?}");
        assert_eq!(sealed(), None);
        let count = kept.count();
        assert!(count.is_multiple_of(2) && kept.at(count).is_some());
        // A flow two hours on moves the events' clock: the seal moves the hour's slices out
        // of trail_recent. The coverage kept said the hour was unsealed, and read alone it
        // would send the lookup to trail_recent, now without them.
        let later = T0 + 2 * 3_600 * SEC + 300 * SEC;
        w.write_batch([flow(ev(
            EventKind::New,
            2,
            "10.77.0.41",
            5001,
            41201,
            later,
            None,
        ))])
        .unwrap();
        assert!(sealed().is_some_and(|h| h as u64 >= T0 / 3_600 / SEC));
        let a = ask();
        assert_eq!((a.status, a.matches.len()), (WhoStatus::Found, 1), "{a:?}");
        let f = &a.matches[0].flow;
        assert_eq!(
            (f.internal_ip.as_str(), f.internal_port),
            ("10.77.0.40", 5000)
        );
        assert!(kept.count() > count && kept.count().is_multiple_of(2));
        // A gap recorded over the instant: the next lookup says so.
        let count = kept.count();
        w.write_batch([WriterMsg::Gap {
            source: "conntrack",
            start_ns: T0 + 14 * SEC,
            end_ns: T0 + 16 * SEC,
            lost: Some(7),
            reason: "test overflow",
        }])
        .unwrap();
        assert!(kept.count() > count);
        let a = ask();
        assert_eq!(
            (a.status, a.matches.len()),
            (WhoStatus::Incomplete, 1),
            "{a:?}"
        );
        assert_eq!((a.holes.len(), a.holes[0].lost), (1, Some(7)));
        drop(conn);
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn instants_in_a_gap_or_outside_sessions_are_incomplete() {
        let mut msgs = vec![flow(ev(
            EventKind::New,
            9,
            "10.77.0.30",
            5000,
            40009,
            T0 + 5 * SEC,
            None,
        ))];
        msgs.push(WriterMsg::Gap {
            source: "conntrack",
            start_ns: T0 + 10 * SEC,
            end_ns: T0 + 20 * SEC,
            lost: Some(1873),
            reason: "test overflow",
        });
        let db = Db::new("gap", msgs);
        // Inside the gap, with no flow on the port: incomplete, not "none".
        let a = db.who(40010, T0 + 15 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Incomplete);
        assert!(a.matches.is_empty());
        assert_eq!(a.holes.len(), 1);
        let h = &a.holes[0];
        assert_eq!((h.kind, h.lost), (HoleKind::Gap, Some(1873)));
        assert_eq!(h.source.as_deref(), Some("conntrack"));
        // A flow that covers the instant is listed, yet the hole is reported.
        let a = db.who(40009, T0 + 15 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Incomplete);
        assert_eq!(a.matches.len(), 1);
        // Outside the gap, but the window reaches into it: covered, hole listed.
        let a = db.who(40010, T0 + 25 * SEC, 6);
        assert_eq!(a.status, WhoStatus::None);
        assert_eq!(a.holes.len(), 1);
        // Clear of the gap: a plain "none".
        let a = db.who(40010, T0 + 40 * SEC, 0);
        assert_eq!((a.status, a.holes.len()), (WhoStatus::None, 0));
        // Before the first capture session: incomplete, no agent was running.
        let a = db.who(40010, T0 - 7_200 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Incomplete);
        assert_eq!(a.holes[0].kind, HoleKind::Stopped);
    }

    #[test]
    fn open_flows_have_no_end() {
        let db = reuse_db("open");
        let a = db.who(40002, T0 + 100 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Found);
        assert!(a.matches[0].flow.end.is_none());
        assert_eq!(
            db.who(40002, T0, 0).status,
            WhoStatus::None,
            "before it started"
        );
    }

    #[test]
    fn flows_ended_since_the_checkpoint_are_not_shown_open() {
        use EventKind::{Destroy, New};
        // T0 is 800 s into its hour. Flow 1 opens 100 s before the hour's end; flow 2 opens 5 s
        // after it, which sweeps the hour (flow 1's interim slice there, no end) and, a minute
        // after the first commit by the events' clock, checkpoints flow 1 as open; then flow
        // 1's DESTROY writes its final slice to trail_recent. The seal, two minutes past the
        // hour, has not run: the checkpoint's record of flow 1 is stale.
        let end = T0 + 2_800 * SEC;
        let start = end - 100 * SEC;
        let trail = |name: &str, stop: u64| {
            let db = Db::batches(
                name,
                vec![
                    vec![flow(ev(New, 1, "10.77.2.1", 7001, 42001, start, None))],
                    vec![flow(ev(
                        New,
                        2,
                        "10.77.2.2",
                        7002,
                        42002,
                        end + 5 * SEC,
                        None,
                    ))],
                    vec![flow(ev(
                        Destroy,
                        1,
                        "10.77.2.1",
                        7001,
                        42001,
                        start,
                        Some(stop),
                    ))],
                ],
            );
            let conn = crate::store::schema::open_ro(&db.path).unwrap();
            let stale: u64 = conn
                .query_row(
                    "SELECT count(*) FROM open_flows WHERE reply_dport = 42001",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(stale, 1, "the checkpoint still lists flow 1");
            (db, conn)
        };
        let list = |conn: &Connection, since: u64, until: u64| -> Vec<(u16, Option<i64>)> {
            flows_between(conn, since, until)
                .into_iter()
                .map(|f| (f.internal_port, f.end_us))
                .collect()
        };

        // Ended 30 s after the hour's end: asked about in the hour before, it is found by its
        // interim slice and comes with its end; asked about after its end, it is gone.
        let stop = end + 30 * SEC;
        let (db, conn) = trail("ended-in-next-hour", stop);
        let hour = (end / SEC / 3_600) as i32 - 1;
        let slices: Vec<(i32, u8)> = conn
            .prepare("SELECT hour, flags & 1 FROM trail_recent WHERE pub_port = 42001 ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            slices,
            vec![(hour, 0), (hour + 1, 1)],
            "interim, then final"
        );
        let a = db.who(42001, end - 50 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        assert_eq!(a.matches[0].flow.internal_port, 7001);
        assert_eq!(a.matches[0].flow.end_us, Some((stop / 1_000) as i64));
        assert_eq!(db.who(42001, stop + 10 * SEC, 0).status, WhoStatus::None);
        let stop_us = Some((stop / 1_000) as i64);
        assert_eq!(
            list(&conn, end - 60 * SEC, end - 40 * SEC),
            [(7001, stop_us)]
        );
        assert_eq!(
            list(&conn, stop + 10 * SEC, stop + 20 * SEC),
            [(7002, None)]
        );
        drop(conn);

        // Ended 50 s before the hour's end (its DESTROY received late) and asked about just
        // after it: its final slice is in the hour before the one asked.
        let (db, conn) = trail("ended-before-hour-asked", end - 50 * SEC);
        assert_eq!(db.who(42001, end + 2 * SEC, 0).status, WhoStatus::None);
        assert_eq!(db.who(42001, end - 60 * SEC, 0).status, WhoStatus::Found);
        assert_eq!(list(&conn, end + SEC, end + 3 * SEC), []);
    }

    #[test]
    fn flows_and_lookups_across_midnight_read_both_days_tables() {
        use EventKind::{Destroy, New};
        // T0 is 22:13:20 UTC on 14 November 2023: midnight comes 6,400 s later.
        let midnight = T0 + 6_400 * SEC;
        let at = |s: i64| midnight.checked_add_signed(s * SEC as i64).unwrap();
        let (a, b, c) = (
            (at(-600), at(-300)),
            (at(-120), at(600)),
            (at(1_200), at(1_500)),
        );
        // One event a commit, in time order; the last moves the clock three hours on, so
        // that both hours around midnight are sealed, each into its day's tables.
        let events = [
            ev(New, 1, "10.77.0.20", 6000, 41001, a.0, None),
            ev(Destroy, 1, "10.77.0.20", 6000, 41001, a.0, Some(a.1)),
            ev(New, 2, "10.77.0.21", 6001, 41002, b.0, None),
            ev(Destroy, 2, "10.77.0.21", 6001, 41002, b.0, Some(b.1)),
            ev(New, 3, "10.77.0.22", 6002, 41003, c.0, None),
            ev(Destroy, 3, "10.77.0.22", 6002, 41003, c.0, Some(c.1)),
            ev(New, 4, "10.77.0.23", 6003, 41004, at(3 * 3_600), None),
        ];
        let db = Db::batches(
            "midnight",
            events.into_iter().map(|e| vec![flow(e)]).collect(),
        );
        let conn = crate::store::schema::open_ro(&db.path).unwrap();
        assert_eq!(crate::store::days::list(&conn).unwrap(), [19_675, 19_676]);
        let list = |since: u64, until: u64| -> Vec<(u16, Option<i64>, Option<i64>)> {
            flows_between(&conn, since, until)
                .into_iter()
                .map(|f| (f.internal_port, f.start_us, f.end_us))
                .collect()
        };
        let us = |ns: u64| Some((ns / 1_000) as i64);
        let (fa, fb, fc) = (
            (6000, us(a.0), us(a.1)),
            (6001, us(b.0), us(b.1)),
            (6002, us(c.0), us(c.1)),
        );
        // Across midnight: both days; flow 2 once, with its end from the second day.
        assert_eq!(list(at(-3_600), at(1_800)), [fa, fb, fc]);
        // Before midnight only: flow 2 found by its interim slice, its end still resolved.
        assert_eq!(list(at(-3_600), at(-1)), [fa, fb]);
        // After midnight only: flow 2 alive at 00:05.
        assert_eq!(list(at(300), at(1_800)), [fb, fc]);
        drop(conn);
        let w = db.who(41002, at(-60), 0);
        assert_eq!(w.status, WhoStatus::Found, "{w:?}");
        assert_eq!(
            (w.matches[0].flow.internal_port, w.matches[0].flow.end_us),
            (6001, us(b.1))
        );
    }

    #[test]
    fn a_long_flows_end_is_read_from_its_start_days_ends_table() {
        use EventKind::{Destroy, New};
        let h = 3_600 * SEC;
        // T0 is 22:13:20 UTC on 14 November 2023. Two flows live through 23:00-00:00 and end
        // after midnight, the one on the lower port last; one ends in the hour after its
        // start, one in the hour it started.
        let (m0, m1) = (T0 + 2_200 * SEC, T0 + 3_400 * SEC);
        let events = [
            ev(New, 1, "10.77.0.30", 7000, 41010, T0, None),
            ev(New, 3, "10.77.0.32", 7002, 41020, T0 + 60 * SEC, None),
            ev(
                Destroy,
                3,
                "10.77.0.32",
                7002,
                41020,
                T0 + 60 * SEC,
                Some(T0 + 120 * SEC),
            ),
            ev(New, 2, "10.77.0.31", 7001, 41005, T0 + 600 * SEC, None),
            ev(New, 5, "10.77.0.34", 7004, 41015, m0, None),
            ev(Destroy, 5, "10.77.0.34", 7004, 41015, m0, Some(m1)),
            ev(Destroy, 1, "10.77.0.30", 7000, 41010, T0, Some(T0 + 2 * h)),
            ev(
                Destroy,
                2,
                "10.77.0.31",
                7001,
                41005,
                T0 + 600 * SEC,
                Some(T0 + 4 * h),
            ),
            ev(New, 4, "10.77.0.33", 7003, 41030, T0 + 7 * h, None),
        ];
        let db = Db::batches("ends", events.into_iter().map(|e| vec![flow(e)]).collect());
        let ms = |ns: u64| (ns / 1_000_000) as i64;
        let rows = |table: &str| -> Vec<(u16, i64, i64, i32)> {
            let conn = crate::store::schema::open_ro(&db.path).unwrap();
            conn.prepare(&format!(
                "SELECT pub_port, start_ms, end_ms, hour FROM {table} ORDER BY rowid"
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let hour = |ns: u64| crate::store::trail::hour_of(ms(ns));
        // Sealed in two seals, the later one's row first: the table is kept sorted. The flow
        // that ended in the hour after its start is not there.
        assert_eq!(
            rows("flow_ends_20231114"),
            [
                (41005, ms(T0 + 600 * SEC), ms(T0 + 4 * h), hour(T0 + 4 * h)),
                (41010, ms(T0), ms(T0 + 2 * h), hour(T0 + 2 * h)),
            ]
        );
        assert_eq!(rows("flow_ends_20231115"), []);
        let rw = |sql: &str| {
            let d = crate::store::database::Database::open_rw(&db.path).unwrap();
            d.connect().unwrap().execute_batch(sql).unwrap();
        };
        let end_at = |port: u16, at: u64| -> (u16, Option<i64>, Option<u64>) {
            let w = db.who(port, at, 0);
            assert_eq!(w.status, WhoStatus::Found, "{w:?}");
            let f = &w.matches[0].flow;
            (f.internal_port, f.end_us, f.bytes_in)
        };
        let found = (7000, Some(ms(T0 + 2 * h) * 1_000), Some(900));
        // Asked in its second hour, by its interim slice: the end is read from the ends
        // table, not from the hour it ended in, which is no longer consulted.
        assert_eq!(end_at(41010, T0 + h), found);
        // Asked in the hour it started: its end is in the next hour's table.
        assert_eq!(
            end_at(41015, m0 + 60 * SEC),
            (7004, Some(ms(m1) * 1_000), Some(900))
        );
        rw(&format!(
            "DELETE FROM flow_sealed_20231115 WHERE pub_port = 41010 AND hour = {}",
            hour(T0 + 2 * h)
        ));
        assert_eq!(end_at(41010, T0 + h), found);
        // An interim slice sealed before the ends were kept: the hours after are searched.
        rw("UPDATE trail_state SET ends_from = 1 + (SELECT sealed_hour FROM trail_state)");
        assert_eq!(end_at(41010, T0 + h), (7000, None, None));
        assert_eq!(
            end_at(41005, T0 + h),
            (7001, Some(ms(T0 + 4 * h) * 1_000), Some(900))
        );
    }

    #[test]
    fn a_socket_sending_to_two_destinations_at_once_keeps_its_two_flows_apart() {
        use EventKind::{Destroy, New};
        let h = 3_600 * SEC;
        // One client socket, one public port (an endpoint-independent mapping), two
        // destinations from the same millisecond: two flows told apart only by destination,
        // both living through midnight, ending at 01:13 and 03:13.
        let to = |mut e: FlowEvent, dst: &str, bytes_in: u64| {
            e.orig.dst = ip(dst);
            e.reply.src = ip(dst);
            if let Some(c) = e.counters_reply.as_mut() {
                c.bytes = bytes_in;
            }
            e
        };
        let a = |kind, stop| {
            to(
                ev(kind, 1, "10.77.0.40", 7100, 41100, T0, stop),
                "198.51.100.2",
                900,
            )
        };
        let b = |kind, stop| {
            to(
                ev(kind, 2, "10.77.0.40", 7100, 41100, T0, stop),
                "198.51.100.3",
                1_900,
            )
        };
        let events = [
            a(New, None),
            b(New, None),
            a(Destroy, Some(T0 + 3 * h)),
            b(Destroy, Some(T0 + 5 * h)),
            ev(New, 3, "10.77.0.41", 7101, 41101, T0 + 7 * h, None),
        ];
        let db = Db::batches("twins", events.into_iter().map(|e| vec![flow(e)]).collect());
        let ends = |at: u64| -> Vec<(String, Option<i64>, Option<u64>)> {
            let w = db.who(41100, at, 0);
            let mut m: Vec<_> = w
                .matches
                .iter()
                .map(|m| (m.flow.dst_ip.clone(), m.flow.end_us, m.flow.bytes_in))
                .collect();
            m.sort();
            m
        };
        let us = |ns: u64| Some((ns / 1_000) as i64);
        let (fa, fb) = (
            ("198.51.100.2".to_string(), us(T0 + 3 * h), Some(900)),
            ("198.51.100.3".to_string(), us(T0 + 5 * h), Some(1_900)),
        );
        // Both alive at 23:13: both found, each with its own end.
        assert_eq!(db.who(41100, T0 + h, 0).status, WhoStatus::Ambiguous);
        assert_eq!(ends(T0 + h), [fa.clone(), fb.clone()]);
        // At 02:13 only the second is alive: its interim slice alone, its end from the ends.
        assert_eq!(db.who(41100, T0 + 4 * h, 0).status, WhoStatus::Found);
        assert_eq!(ends(T0 + 4 * h), [fb]);
        // The second one's slice of 23:00 lost: the first's interim slice is alone in its
        // hour, and the two ends after it differ in destination; its own tells them apart.
        let d = crate::store::database::Database::open_rw(&db.path).unwrap();
        let gone = d
            .connect()
            .unwrap()
            .execute(
                "DELETE FROM flow_sealed_20231114 WHERE pub_port = 41100 AND hour = ?
                 AND dst_id = (SELECT id FROM trail_dst_20231114 WHERE hour = ? AND dst4 = ?)",
                duckdb::params![
                    crate::store::trail::hour_of(((T0 + h) / 1_000_000) as i64),
                    crate::store::trail::hour_of(((T0 + h) / 1_000_000) as i64),
                    u32::from(std::net::Ipv4Addr::new(198, 51, 100, 3)),
                ],
            )
            .unwrap();
        assert_eq!(gone, 1);
        drop(d);
        assert_eq!(ends(T0 + h), [fa]);
    }

    #[test]
    fn a_start_from_an_unset_clock_backfills_at_most_a_week_of_interim_slices() {
        use EventKind::{Destroy, New};
        let h = 3_600 * SEC;
        // Started, by the kernel's stamp, one second after the epoch (a clock not yet set):
        // one flow seen open, one seen only by its DESTROY.
        let mut open = ev(New, 11, "10.77.0.50", 7200, 41200, T0, None);
        open.start_ns = Some(SEC);
        let gone = ev(
            Destroy,
            12,
            "10.77.0.51",
            7201,
            41201,
            SEC,
            Some(T0 + 60 * SEC),
        );
        let later = ev(New, 13, "10.77.0.52", 7202, 41202, T0 + 2 * h, None);
        let db = Db::batches(
            "unset-clock",
            vec![vec![flow(open)], vec![flow(gone)], vec![flow(later)]],
        );
        let conn = crate::store::schema::open_ro(&db.path).unwrap();
        let slices = |port: u16| -> i64 {
            conn.query_row(
                "SELECT count(*) FROM (SELECT pub_port FROM trail_recent
                                       UNION ALL SELECT pub_port FROM flow_sealed)
                 WHERE pub_port = ?",
                [port],
                |r| r.get(0),
            )
            .unwrap()
        };
        // A week of interim slices each (and the final one of the ended flow), not one for
        // every hour since 1970.
        assert_eq!((slices(41200), slices(41201)), (168, 169));
        assert!(crate::store::days::list(&conn).unwrap().len() <= 9);
        drop(conn);
        // Within the week it is found, with the start the kernel gave (incomplete: no agent
        // captured then).
        let w = db.who(41201, T0 - 72 * h, 0);
        assert_eq!(
            (w.status, w.matches.len()),
            (WhoStatus::Incomplete, 1),
            "{w:?}"
        );
        assert_eq!(
            (w.matches[0].flow.internal_port, w.matches[0].flow.start_us),
            (7201, Some(1_000_000))
        );
    }

    #[test]
    fn destroy_without_start_still_answers_from_kernel_times() {
        let db = Db::new(
            "orphan",
            vec![flow(ev(
                EventKind::Destroy,
                9,
                "10.77.0.30",
                6000,
                40005,
                T0,
                Some(T0 + 4 * SEC),
            ))],
        );
        let a = db.who(40005, T0 + 2 * SEC, 0);
        assert_eq!(a.status, WhoStatus::Found, "{a:?}");
        assert_eq!(a.matches[0].flow.internal_ip, "10.77.0.30");
    }

    #[test]
    fn dump_does_not_duplicate_and_closes_vanished_flows() {
        let db = Db::new(
            "dump",
            vec![
                flow(ev(EventKind::New, 1, "10.77.0.10", 5000, 40001, T0, None)),
                flow(ev(EventKind::New, 2, "10.77.0.11", 5001, 40002, T0, None)),
                WriterMsg::DumpBegin,
                flow(ev(EventKind::Dump, 1, "10.77.0.10", 5000, 40001, T0, None)),
                flow(ev(
                    EventKind::Dump,
                    3,
                    "10.77.0.12",
                    5002,
                    40003,
                    T0 + SEC,
                    None,
                )),
                WriterMsg::DumpEnd {
                    at_ns: T0 + 60 * SEC,
                    alive_until_ns: Some(T0 + 30 * SEC),
                },
            ],
        );
        let a = db.who(40001, T0 + 100 * SEC, 0);
        assert_eq!(
            (a.status, a.matches[0].flow.end.is_none()),
            (WhoStatus::Found, true),
            "{a:?}"
        );
        let b = db.who(40002, T0 + 45 * SEC, 0);
        assert_eq!(b.status, WhoStatus::Found, "{b:?}");
        let f = &b.matches[0].flow;
        assert!(f.end_inexact && f.end_not_before.is_some(), "{f:?}");
        assert_eq!(db.who(40002, T0 + 61 * SEC, 0).status, WhoStatus::None);
        let c = db.who(40003, T0 + 100 * SEC, 0);
        assert!(c.matches[0].flow.found_by_dump);
    }
}
