//! A synthetic NAT trail: a gateway's day of flows, written through the agent's own writer,
//! with ground-truth lookup cases. Used by `cargo xtask gen-trail` (through the `gen_trail`
//! example) and by tests, which include this file as a module.
//!
//! The mix follows a campus gateway: about 55% UDP (mostly DNS, some QUIC), 43% TCP
//! (milliseconds to hours, a few 12-hour sessions), 2% ICMP; ~30,000 clients behind a handful
//! of public addresses; 5% IPv6 (not translated: public = internal). A public (address, port)
//! pair is held by one flow at a time and handed to the next as soon as it is free, so ports
//! are reused within seconds, as on a busy NAT.

use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;

use nattrail::pipeline::flow::{Addr, Counters, EventKind, FlowEvent, IPS_SRC_NAT, Tuple};
use nattrail::pipeline::messages::WriterMsg;
use nattrail::store::schema::StoreError;
use nattrail::store::writer::{Writer, WriterConfig, WriterStats};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Flows in all.
    pub flows: u64,
    /// Days they start over.
    pub days: u32,
    /// The first instant, ns since the epoch.
    pub start_ns: u64,
    /// Internal IPv4 clients.
    pub clients: u32,
    /// Public IPv4 addresses of the NAT.
    pub publics: u8,
    /// The NAT's port range on each public address (a CGNAT's port block is narrow, which
    /// crowds it: ports are reused within seconds).
    pub ports: (u16, u16),
    /// Seed of the pseudo-random choices.
    pub seed: u64,
    /// One flow in `case_every` (and every 12-hour flow, and each quick port reuse up to
    /// `max_cases`) becomes a lookup case.
    pub case_every: u64,
    /// Cases at most.
    pub max_cases: usize,
    /// Over the trail's last `live_tail_s` seconds, a commit every second of its clock, as
    /// the agent's writer makes with live traffic: the trail then ends as a running agent's
    /// does, with flows ended since the last open-flow checkpoint (every minute) still listed
    /// there as open. Otherwise (0) commits come every `batch_rows` rows, and the last one
    /// checkpoints.
    pub live_tail_s: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            flows: 1_000_000,
            days: 1,
            start_ns: 1_767_225_600_000_000_000, // 2026-01-01T00:00:00Z
            clients: 30_000,
            publics: 8,
            ports: (1_024, 65_535),
            seed: 1,
            case_every: 2_000,
            max_cases: 2_000,
            live_tail_s: 0,
        }
    }
}

/// Why a case was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseKind {
    /// A sampled flow, asked about in its middle.
    Sampled,
    /// A 12-hour flow, asked about at several instants.
    Long,
    /// The last instant of a flow whose public port went to another within 5 s.
    ReusedBefore,
    /// The first instant of the flow that took that port.
    ReusedAfter,
    /// An IPv6 flow.
    V6,
    /// A flow still open when the trail ends.
    Open,
    /// A flow of the trail's last hour, asked about in its middle: the hours not sealed
    /// yet, which an operator asks about during an incident.
    Recent,
}

impl CaseKind {
    /// Its name in the cases file.
    pub fn name(self) -> &'static str {
        match self {
            CaseKind::Sampled => "sampled",
            CaseKind::Long => "long",
            CaseKind::ReusedBefore => "reused-before",
            CaseKind::ReusedAfter => "reused-after",
            CaseKind::V6 => "v6",
            CaseKind::Open => "open",
            CaseKind::Recent => "recent",
        }
    }
}

/// A lookup with its one right answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Why it was chosen.
    pub kind: CaseKind,
    /// IP protocol.
    pub proto: u8,
    /// Public address and port asked about.
    pub public: (IpAddr, u16),
    /// The instant, ns.
    pub at_ns: u64,
    /// The internal endpoint that held it then.
    pub internal: (IpAddr, u16),
    /// When that flow ended, ns; None while it is still open at the trail's end.
    pub end_ns: Option<u64>,
}

/// What was written.
#[derive(Debug, Default, Clone)]
pub struct GenStats {
    /// Flows started.
    pub flows: u64,
    /// Events handed to the writer (NEW and DESTROY).
    pub events: u64,
    /// Flows still open at the end.
    pub open_at_end: u64,
    /// Flows by protocol: TCP, UDP, ICMP.
    pub by_proto: [u64; 3],
    /// IPv6 flows.
    pub v6: u64,
    /// Flows of 12 hours.
    pub long: u64,
    /// Public ports taken within 5 s of their last flow's end.
    pub quick_reuse: u64,
    /// Last instant of the trail, ns.
    pub end_ns: u64,
}

/// SplitMix64: small, fast, and the same sequence for a seed on every machine.
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform between `lo` and `hi` (both > 0).
    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }
}

/// A flow waiting for its end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    end_ns: u64,
    ev: FlowEvent,
}

impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Earliest end first out of the max-heap.
        o.end_ns
            .cmp(&self.end_ns)
            .then(o.ev.ct_id.cmp(&self.ev.ct_id))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

const SEC: f64 = 1e9;

fn public_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 10 + i)
}

/// The agent's default writer settings, on the trail at `db`.
pub fn writer_config(db: &Path) -> WriterConfig {
    WriterConfig {
        db_path: db.to_path_buf(),
        ..WriterConfig::from_config(&nattrail::config::Config::default())
    }
}

/// Opens a writer on `db` with [`writer_config`] and writes the trail through it; returns the
/// writer, what it wrote and the cases.
pub fn write_trail(
    db: &Path,
    cfg: &GenConfig,
) -> Result<(Writer, GenStats, Vec<Case>), StoreError> {
    let mut writer = Writer::open(&writer_config(db), Arc::new(WriterStats::default()))?;
    let (stats, cases) = generate(cfg, &mut writer)?;
    Ok((writer, stats, cases))
}

/// Writes the trail through `writer`; returns what it wrote and the cases.
pub fn generate(cfg: &GenConfig, writer: &mut Writer) -> Result<(GenStats, Vec<Case>), StoreError> {
    let mut rng = Rng(cfg.seed);
    let span_ns = u64::from(cfg.days) * 86_400 * 1_000_000_000;
    let mean_gap = span_ns as f64 / cfg.flows.max(1) as f64;
    // When each public port of each address is free again, and who had it last.
    let publics = usize::from(cfg.publics.max(1));
    let mut free_at = vec![0u64; publics * 65_536];
    let mut last_holder: Vec<Option<(u64, IpAddr, u16)>> = vec![None; publics * 65_536];
    let mut pending: BinaryHeap<Pending> = BinaryHeap::new();
    let mut stats = GenStats::default();
    let mut cases = Vec::new();
    // Kept apart and appended at the end, so that the other cases are the same with or
    // without them (the first `max_cases` run out long before the last hour).
    let mut recent = Vec::new();
    let mut t = cfg.start_ns as f64;
    let end_of_trail = cfg.start_ns + span_ns;
    let last_hour = end_of_trail.saturating_sub(3_600_000_000_000);
    let mut next_commit = end_of_trail.saturating_sub(cfg.live_tail_s * SEC as u64);
    let mut live_commit = |writer: &mut Writer, at: u64| -> Result<(), StoreError> {
        if cfg.live_tail_s > 0 && at >= next_commit {
            writer.commit_pending()?;
            next_commit = (at / SEC as u64 + 1) * SEC as u64;
        }
        Ok(())
    };

    for n in 0..cfg.flows {
        t += mean_gap * -(1.0 - rng.unit()).ln();
        let start = (t as u64).min(end_of_trail - 1);
        while pending.peek().is_some_and(|p| p.end_ns <= start) {
            let p = pending.pop().expect("peeked");
            live_commit(writer, p.end_ns)?;
            // One message at a time, committed every `batch_rows` rows: the agent's writer.
            writer.write(WriterMsg::Flow {
                ev: p.ev,
                received_ns: p.end_ns,
            })?;
            stats.events += 1;
        }
        let v6 = rng.below(100) < 5;
        let r = rng.below(1000);
        let (proto, dur_s, dport) = if r < 20 {
            (1u8, rng.log_uniform(0.001, 0.05), 0u16)
        } else if r < 570 {
            if rng.below(10) == 0 {
                (17, rng.log_uniform(1.0, 600.0), 443)
            } else {
                (17, 30.0 + rng.log_uniform(0.005, 0.2), 53)
            }
        } else if rng.below(2_000) == 0 {
            stats.long += 1;
            (6, 43_200.0, 443)
        } else if rng.below(50) == 0 {
            (6, rng.log_uniform(600.0, 7_200.0), 443)
        } else {
            (
                6,
                120.0 + rng.log_uniform(0.05, 600.0),
                [443, 80, 22, 993][rng.below(4) as usize],
            )
        };
        let end = start.saturating_add((dur_s * SEC) as u64);
        let client = rng.below(u64::from(cfg.clients.max(1))) as u32;
        // Destinations spread over the whole address space, as the internet's are (a
        // contiguous block would flatter the storage's compression).
        let server = rng.below(5_000) as u32;
        let scattered = (server + 1).wrapping_mul(0x9E37_79B1);
        // IPv6 is not translated: the internal port is the public one, so it must not be
        // held twice at once (sequential ports do that; random ones could collide).
        let internal_port = if v6 {
            32_768 + (n % 28_232) as u16
        } else {
            32_768 + rng.below(28_232) as u16
        };
        let (family, internal, server_ip, public, public_port, status);
        if v6 {
            stats.v6 += 1;
            family = 6u8;
            let c = Ipv6Addr::new(
                0xfd00,
                0,
                0,
                0x10,
                0,
                0,
                (client >> 16) as u16,
                client as u16,
            );
            internal = IpAddr::V6(c);
            server_ip = IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                (scattered >> 16) as u16,
                scattered as u16,
                0,
                0,
                (server >> 16) as u16,
                server as u16,
            ));
            public = internal;
            public_port = internal_port;
            status = 0;
        } else {
            family = 4;
            let c = 0x0a00_0000u32 | (client + 2);
            internal = IpAddr::V4(Ipv4Addr::from(c));
            server_ip = IpAddr::V4(Ipv4Addr::from(scattered));
            // SNAT hashes the client to one address; the port is the first free one from a
            // random place.
            let pi = (client as usize) % publics;
            public = IpAddr::V4(public_v4(pi as u8));
            let (lo, hi) = cfg.ports;
            let mut port = lo + rng.below(u64::from(hi - lo) + 1) as u16;
            loop {
                let k = pi * 65_536 + usize::from(port);
                if free_at[k] <= start {
                    if let Some((was_end, who, wport)) = last_holder[k]
                        && start.saturating_sub(was_end) < 5_000_000_000
                        && was_end > cfg.start_ns
                    {
                        stats.quick_reuse += 1;
                        if cases.len() + 2 <= cfg.max_cases && stats.quick_reuse % 50 == 1 {
                            cases.push(Case {
                                kind: CaseKind::ReusedBefore,
                                proto,
                                public: (public, port),
                                at_ns: was_end - 1_000_000,
                                internal: (who, wport),
                                end_ns: Some(was_end),
                            });
                            cases.push(Case {
                                kind: CaseKind::ReusedAfter,
                                proto,
                                public: (public, port),
                                at_ns: start + 1_000_000,
                                internal: (internal, internal_port),
                                end_ns: (end < end_of_trail).then_some(end),
                            });
                        }
                    }
                    free_at[k] = end.saturating_add(1);
                    last_holder[k] = Some((end, internal, internal_port));
                    break;
                }
                port = if port >= hi { lo } else { port + 1 };
            }
            public_port = port;
            status = IPS_SRC_NAT;
        }
        stats.by_proto[match proto {
            6 => 0,
            17 => 1,
            _ => 2,
        }] += 1;
        // ICMP as the kernel reports it: the id in the source port, no destination port.
        let (sport, dport, rsport) = if proto == 1 {
            (internal_port, 0, public_port)
        } else {
            (internal_port, dport, dport)
        };
        let ev = FlowEvent {
            kind: EventKind::New,
            family,
            proto,
            orig: Tuple {
                src: Addr::from(internal),
                dst: Addr::from(server_ip),
                sport,
                dport,
            },
            reply: Tuple {
                src: Addr::from(server_ip),
                dst: Addr::from(public),
                sport: rsport,
                dport: public_port,
            },
            ct_id: n as u32,
            zone: 0,
            mark: 0,
            status,
            tcp_state: None,
            icmp: (proto == 1).then_some((8, 0)),
            counters_orig: None,
            counters_reply: None,
            start_ns: Some(start),
            stop_ns: None,
            event_ns: Some(start),
        };
        // IPv6 flows are sampled twenty times as often: they are one flow in twenty.
        let every = cfg.case_every.max(1);
        let sample = if v6 {
            n % (every / 20).max(1) == 0
        } else {
            n % every == 0
        };
        let is_long = dur_s >= 43_200.0;
        let case = |kind: CaseKind, at_ns: u64| Case {
            kind,
            proto,
            public: (public, public_port),
            at_ns,
            internal: (internal, internal_port),
            end_ns: (end < end_of_trail).then_some(end),
        };
        let want = |k: CaseKind, at: u64, cases: &mut Vec<Case>| {
            if cases.len() < cfg.max_cases {
                cases.push(case(k, at));
            }
        };
        // One flow in `case_every` whatever its family: IPv6 as often as in the traffic.
        if n % every == 0 && start >= last_hour && recent.len() < (cfg.max_cases / 50).max(1) {
            recent.push(case(
                CaseKind::Recent,
                start + (end.min(end_of_trail) - start) / 2,
            ));
        }
        if end >= end_of_trail {
            if sample {
                want(
                    CaseKind::Open,
                    start + (end_of_trail - start) / 2,
                    &mut cases,
                );
            }
        } else if is_long {
            for frac in [0.01, 0.5, 0.99] {
                want(
                    CaseKind::Long,
                    start + ((end - start) as f64 * frac) as u64,
                    &mut cases,
                );
            }
        } else if sample {
            let kind = if v6 { CaseKind::V6 } else { CaseKind::Sampled };
            want(kind, start + (end - start) / 2, &mut cases);
        }
        live_commit(writer, start)?;
        writer.write(WriterMsg::Flow {
            ev: ev.clone(),
            received_ns: start,
        })?;
        stats.events += 1;
        stats.flows += 1;
        if end < end_of_trail {
            let mut d = ev;
            d.kind = EventKind::Destroy;
            d.stop_ns = Some(end);
            d.event_ns = Some(end);
            let pk = 1 + rng.below(200);
            d.counters_orig = Some(Counters {
                packets: pk,
                bytes: pk * (60 + rng.below(1400)),
            });
            d.counters_reply = Some(Counters {
                packets: pk,
                bytes: pk * (60 + rng.below(1400)),
            });
            pending.push(Pending { end_ns: end, ev: d });
        } else {
            stats.open_at_end += 1;
        }
    }
    while let Some(p) = pending.pop() {
        if p.end_ns >= end_of_trail {
            stats.open_at_end += 1;
            continue;
        }
        live_commit(writer, p.end_ns)?;
        writer.write(WriterMsg::Flow {
            ev: p.ev,
            received_ns: p.end_ns,
        })?;
        stats.events += 1;
    }
    writer.commit_pending()?;
    stats.end_ns = end_of_trail;
    cases.extend(recent);
    Ok((stats, cases))
}

/// Marks the writer's capture session as covering the whole generated span (the writer
/// started it at the real now, after the trail's instants).
pub fn cover_span(
    conn: &duckdb::Connection,
    session_id: u64,
    start_ns: u64,
    end_ns: u64,
) -> duckdb::Result<usize> {
    conn.execute(
        "UPDATE capture_sessions SET started = make_timestamp(?), last_seen = greatest(last_seen, make_timestamp(?)) WHERE id = ?",
        duckdb::params![(start_ns / 1_000) as i64, (end_ns / 1_000) as i64, session_id],
    )
}

/// What `who` answers for public `(ip, port)` at `at_ns`, with no tolerance: its status and
/// the internal endpoints of its matches, best first, with each match's end in µs.
pub fn ask(
    conn: &duckdb::Connection,
    kept: &nattrail::query::coverage::KeptCoverage,
    public: (IpAddr, u16),
    at_ns: u64,
) -> Result<Answer, nattrail::query::QueryError> {
    use chrono::TimeZone;
    let q = nattrail::query::who::WhoQuery {
        ip: public.0,
        port: public.1,
        at: chrono::Utc.timestamp_nanos(at_ns as i64),
        tolerance: std::time::Duration::ZERO,
        proto: None,
        dst_ip: None,
        dst_port: None,
        live: false,
    };
    let a = nattrail::query::who::who_kept(conn, &q, kept)?;
    let got = a
        .matches
        .iter()
        .map(|m| (m.flow.internal_ip.clone(), m.flow.internal_port))
        .collect();
    let ends = a.matches.iter().map(|m| m.flow.end_us).collect();
    Ok((a.status, got, ends))
}

/// `who`'s status, the internal endpoints of its matches and their ends in µs.
pub type Answer = (
    nattrail::query::who::WhoStatus,
    Vec<(String, u16)>,
    Vec<Option<i64>>,
);
