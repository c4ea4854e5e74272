//! Which process, in which container, opened a flow: the flow's original tuple joined to the
//! socket rows of the eBPF socket programs within a few seconds of its start, and the socket's
//! cgroup (or network namespace) to the container run that held it then. Never by address
//! alone: Docker gives a stopped container's address to the next one at once.

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::QueryError;
use super::flows::FlowRow;
use crate::store::sockets::wide;
use crate::store::timestamp::Micros;

/// How far a socket's first packet may lie from the flow's start, either side. Both are
/// stamped by the kernel as the same packet passes; the slack covers a SYN retransmitted
/// before conntrack confirmed the flow.
pub const WINDOW_US: i64 = 2_000_000;

/// How a flow's owner is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerStatus {
    /// A socket of this host or one of its containers opened it.
    Local,
    /// The socket programs were watching and no local socket opened it: forwarded traffic
    /// (a LAN client behind the gateway), which is expected, not a loss.
    None,
    /// Attribution unknown: the socket programs were not running, or lost records, when it
    /// started (or the trail never saw it start).
    Unknown,
}

/// The owner of a flow, as far as it is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    /// local, none or unknown.
    pub status: OwnerStatus,
    /// The owning process (thread group id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its command name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// The file it executed, when its exec (or the start-up snapshot) was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Its user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its network namespace inode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// The container it ran in: full id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The container's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The container's workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The container's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Attribution {
    fn bare(status: OwnerStatus) -> Self {
        Attribution {
            status,
            pid: None,
            comm: None,
            exe: None,
            uid: None,
            netns: None,
            container_id: None,
            container: None,
            workload: None,
            image: None,
        }
    }
}

/// A flow's tuple as the socket rows hold it (protocol, source, translated source,
/// destination, start); None when a part is missing (ICMP, a flow whose start the trail never
/// saw).
fn key(f: &FlowRow) -> Option<Key> {
    let proto = match f.proto.as_str() {
        "tcp" => 6u8,
        "udp" => 17,
        _ => return None,
    };
    let src: std::net::IpAddr = f.internal_ip.parse().ok()?;
    let public: std::net::IpAddr = f.public_ip.parse().ok()?;
    let dst: std::net::IpAddr = f.dst_ip.parse().ok()?;
    Some(Key {
        proto,
        src: (wide(src), f.internal_port),
        public: (wide(public), f.public_port),
        dst: (wide(dst), f.dst_port?),
        start_us: f.start_us?,
    })
}

struct Key {
    proto: u8,
    src: (u128, u16),
    public: (u128, u16),
    dst: (u128, u16),
    start_us: i64,
}

type Row = (
    i64,
    Option<u32>,
    Option<String>,
    Option<u32>,
    Option<u32>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The schema version from which the trail holds socket rows and container runs.
pub const SINCE_SCHEMA: u32 = 10;

/// Fills in `attribution` for each flow: `none` or `unknown` from the socket programs'
/// coverage and gaps, then, when socket rows lie near the flows (none do for the flows a
/// gateway forwards), the owners in one statement that joins them to their processes and
/// containers.
pub fn attribute<'a>(
    conn: &Connection,
    flows: impl IntoIterator<Item = &'a mut FlowRow>,
) -> Result<(), QueryError> {
    attribute_as(conn, flows, false)
}

/// `attribute`; `joined` runs the joining statement even without socket rows near the flows
/// (tests compare both ways).
fn attribute_as<'a>(
    conn: &Connection,
    flows: impl IntoIterator<Item = &'a mut FlowRow>,
    joined: bool,
) -> Result<(), QueryError> {
    let mut flows: Vec<&'a mut FlowRow> = flows.into_iter().collect();
    let keys: Vec<(usize, Key)> = flows
        .iter()
        .enumerate()
        .filter_map(|(i, f)| key(f).map(|k| (i, k)))
        .collect();
    for f in flows.iter_mut() {
        f.attribution = Some(Attribution::bare(OwnerStatus::Unknown));
    }
    let (Some(first), Some(last)) = (
        keys.iter().map(|k| k.1.start_us).min(),
        keys.iter().map(|k| k.1.start_us).max(),
    ) else {
        return Ok(());
    };
    let watch = Watch::read(conn, first - WINDOW_US, last + WINDOW_US)?;
    for (i, k) in &keys {
        if watch.watched(k.start_us) {
            flows[*i].attribution = Some(Attribution::bare(OwnerStatus::None));
        }
    }
    // The joining statement costs 10-20 ms here, mostly planning (its text differs at each
    // call, so no plan is cached); the statement before it 1-3 ms.
    if !joined && !watch.sockets {
        return Ok(());
    }
    // The tuples are numbers this process parsed and formats itself: no text from a caller
    // reaches the statement. Instants are TIMESTAMP literals and compared as timestamps:
    // `epoch_us`, `make_timestamp` and `abs` are core functions, and ordering by an interval
    // calls one (the CLI leaves them unloaded, see `OpenOptions::builtin_only`).
    let ts = |us: i64| -> Result<String, QueryError> {
        chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.format("TIMESTAMP '%Y-%m-%d %H:%M:%S%.6f'").to_string())
            .ok_or_else(|| QueryError::Invalid(format!("flow start {us} µs is out of range")))
    };
    let values = keys
        .iter()
        .map(|(i, k)| {
            Ok(format!(
                "({i}, {}, {}::UHUGEINT, {}, {}::UHUGEINT, {}, {}::UHUGEINT, {}, {})",
                k.proto,
                k.src.0,
                k.src.1,
                k.public.0,
                k.public.1,
                k.dst.0,
                k.dst.1,
                ts(k.start_us)?
            ))
        })
        .collect::<Result<Vec<_>, QueryError>>()?
        .join(", ");
    let sql = format!(
        "WITH f(i, proto, src, sport, pub, pport, dst, dport, t) AS (VALUES {values}),
         -- A container's socket sends from its own namespace, before the host translates the
         -- packet; a host process's socket passes egress after this host's own source NAT.
         tuples AS (SELECT i, proto, src, sport, dst, dport, t FROM f
                    UNION ALL SELECT i, proto, pub, pport, dst, dport, t FROM f),
         owned AS (
            SELECT f.i, s.pid, s.comm, s.uid, s.netns,
                   (SELECT p.filename FROM process_events p
                    WHERE p.pid = s.pid AND p.kind IN (0, 1) AND p.filename IS NOT NULL
                      AND p.start_ts > s.start_ts - INTERVAL '50 milliseconds'
                      AND p.start_ts < s.start_ts + INTERVAL '50 milliseconds'
                      AND p.ts <= s.ts
                    ORDER BY p.ts DESC LIMIT 1) AS exe,
                   c.id AS cid, c.name, c.workload, c.image,
                   -- Nearest to t first: an instant before t mirrored to as far after it.
                   row_number() OVER (PARTITION BY f.i
                       ORDER BY CASE WHEN s.ts >= f.t THEN s.ts ELSE f.t + (f.t - s.ts) END,
                                c.cgroup_id IS NULL) AS rank
            FROM tuples f JOIN socket_events s
              ON s.proto = f.proto AND s.src = f.src AND s.src_port = f.sport
             AND s.dst = f.dst AND s.dst_port = f.dport
             AND s.ts BETWEEN f.t - INTERVAL '{WINDOW_US} microseconds'
                          AND f.t + INTERVAL '{WINDOW_US} microseconds'
            LEFT JOIN containers c
              ON (c.cgroup_id = s.cgroup_id OR (c.cgroup_id IS NULL AND c.netns = s.netns))
             AND s.ts >= c.started AND (c.ended IS NULL OR s.ts <= c.ended))
         SELECT i, pid, comm, uid, netns, exe, cid, name, workload, image
         FROM owned WHERE rank = 1"
    );
    let mut stmt = conn
        .prepare(&sql)
        .map_err(QueryError::db("preparing the attribution query"))?;
    let rows: Vec<Row> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            ))
        })
        .map_err(QueryError::db("running the attribution query"))?
        .collect::<Result<_, _>>()
        .map_err(QueryError::db("reading attributions"))?;
    for (i, pid, comm, uid, netns, exe, cid, name, workload, image) in rows {
        // A socket row without its process leaves the flow as the coverage says.
        let Some(f) = usize::try_from(i).ok().and_then(|i| flows.get_mut(i)) else {
            continue;
        };
        if pid.is_none() {
            continue;
        }
        f.attribution = Some(Attribution {
            status: OwnerStatus::Local,
            pid,
            comm,
            exe,
            uid,
            netns,
            container_id: cid,
            container: name,
            workload,
            image,
        });
    }
    Ok(())
}

/// When the socket programs watched a flow started at `t`: a session's coverage began by
/// `t - WINDOW_US` and the session had not stopped by `t`, and no eBPF gap meets
/// `t ± WINDOW_US`.
struct Watch {
    /// (coverage from, session stopped), µs.
    covered: Vec<(i64, Option<i64>)>,
    /// eBPF gaps (start, end), µs.
    gaps: Vec<(i64, i64)>,
    /// Some socket row lies in the span read.
    sockets: bool,
}

impl Watch {
    /// The coverage and gaps that can matter to flows started between `from_us + WINDOW_US`
    /// and `to_us - WINDOW_US`, and whether socket rows lie between the two. One statement:
    /// on a cold file (the CLI) each statement costs 1-2 ms before it reads anything.
    /// Every column is named and the socket check is a `LIMIT`, not `EXISTS` (planned as an
    /// aggregate): DuckDB 2.0 names those by printing them, which builds its keyword table
    /// once per process by parsing its grammar again (see `schema::max_version`).
    fn read(conn: &Connection, from_us: i64, to_us: i64) -> Result<Self, QueryError> {
        let rows = conn
            .prepare_cached(
                "SELECT 0 AS kind, e.sockets_from AS from_ts, cs.stopped AS to_ts
                 FROM ebpf_coverage e JOIN capture_sessions cs ON cs.id = e.session_id
                 WHERE e.sockets_from <= ?
                 UNION ALL
                 SELECT 1 AS kind, start AS from_ts, \"end\" AS to_ts
                 FROM capture_gaps
                 WHERE source = 'ebpf' AND start <= ? AND \"end\" >= ?
                 UNION ALL
                 (SELECT 2 AS kind, NULL::TIMESTAMP AS from_ts, NULL::TIMESTAMP AS to_ts
                     FROM socket_events WHERE ts BETWEEN ? AND ? LIMIT 1)",
            )
            .and_then(|mut st| {
                let (from, to) = (Micros(from_us), Micros(to_us));
                st.query_map([to, to, from, from, to], |r| {
                    Ok((
                        r.get::<_, i32>(0)?,
                        r.get::<_, Option<Micros>>(1)?.map(|t| t.0),
                        r.get::<_, Option<Micros>>(2)?.map(|t| t.0),
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(QueryError::db(
                "reading the socket programs' coverage and gaps",
            ))?;
        let mut w = Watch {
            covered: Vec::new(),
            gaps: Vec::new(),
            sockets: false,
        };
        for (kind, a, b) in rows {
            match (kind, a, b) {
                (0, Some(from), stopped) => w.covered.push((from, stopped)),
                (1, Some(start), Some(end)) => w.gaps.push((start, end)),
                (2, _, _) => w.sockets = true,
                _ => {}
            }
        }
        Ok(w)
    }

    /// Whether a flow started at `t` (µs) was watched.
    fn watched(&self, t: i64) -> bool {
        self.covered
            .iter()
            .any(|&(from, stopped)| from <= t - WINDOW_US && stopped.is_none_or(|s| s >= t))
            && !self
                .gaps
                .iter()
                .any(|&(start, end)| start <= t + WINDOW_US && end >= t - WINDOW_US)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::{Database, OpenOptions};

    const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z, µs

    fn flow(src: &str, sport: u16, dst: &str, dport: u16, start_us: i64) -> FlowRow {
        FlowRow {
            internal_ip: src.into(),
            internal_port: sport,
            public_ip: "203.0.113.1".into(),
            public_port: sport,
            dst_ip: dst.into(),
            dst_port: Some(dport),
            proto: "tcp".into(),
            start: None,
            end: None,
            end_inexact: false,
            end_not_before: None,
            bytes_out: None,
            packets_out: None,
            bytes_in: None,
            packets_in: None,
            conntrack_id: 0,
            zone: 0,
            found_by_dump: false,
            open: false,
            start_us: Some(start_us),
            end_us: None,
            attribution: None,
        }
    }

    struct Owner {
        pid: u32,
        cgroup: u64,
        netns: u32,
    }

    fn socket(conn: &Connection, src: &str, sport: u16, at_us: i64, o: Owner) {
        let src: std::net::IpAddr = src.parse().unwrap();
        let dst: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        conn.execute(
            &format!(
                "INSERT INTO socket_events VALUES (make_timestamp({at_us}), 6, {}::UHUGEINT, {sport},
                 {}::UHUGEINT, 443, true, {pid}, {pid}, 0, 'curl', make_timestamp({T0}), {netns}, {cgroup}, 1)",
                wide(src),
                wide(dst),
                pid = o.pid,
                netns = o.netns,
                cgroup = o.cgroup,
            ),
            [],
        )
        .unwrap();
    }

    /// Runs `check` on a fresh database filled by `fixture` (in a scratch folder named after
    /// `name`), opened as the agent does (read-write, every function), then as the CLI does
    /// (read-only, DuckDB's built-in functions only).
    fn on_fixture(name: &str, check: impl Fn(&Connection)) {
        let dir = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        let db = Database::open(&path, OpenOptions::default()).unwrap();
        fixture(&db.connect().unwrap());
        check(&db.connect().unwrap());
        drop(db);
        check(
            &Database::open(&path, OpenOptions::lookup())
                .unwrap()
                .connect()
                .unwrap(),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A session watched from T0 + 10 s, an eBPF gap at 100-101 s, three containers and
    /// sockets at 20, 25, 26.5, 33, 60 and 80 s, executions of two of their processes.
    fn fixture(conn: &Connection) {
        let s = |us: i64| format!("make_timestamp({us})");
        conn.execute_batch(&format!(
            "INSERT INTO capture_sessions VALUES (1, {}, NULL, {}, 'h', 'v');
             INSERT INTO ebpf_coverage VALUES (1, {});
             INSERT INTO capture_gaps VALUES (1, 'ebpf', {}, {}, 3, 'ring full');
             INSERT INTO containers VALUES ('aaa', {}, {}, 'first', 'img', 'shop', 11, 7, []);
             INSERT INTO containers VALUES ('bbb', {}, NULL, 'second', 'img', 'shop', 12, 7, []);
             -- A container whose tasks sit in the cgroup-v2 root (the systemd driver on a
             -- hybrid host): known by its network namespace alone.
             INSERT INTO containers VALUES ('ccc', {}, NULL, 'third', 'img', 'batch', NULL, 9, []);",
            s(T0),
            s(T0),
            s(T0 + 10_000_000),
            s(T0 + 100_000_000),
            s(T0 + 101_000_000),
            s(T0),
            s(T0 + 50_000_000),
            s(T0 + 50_000_001),
            s(T0 + 70_000_000),
        ))
        .unwrap();
        // The first container's flow, and the second's from the same address and port.
        let owner = |pid, cgroup, netns| Owner { pid, cgroup, netns };
        socket(
            conn,
            "172.17.0.2",
            40000,
            T0 + 20_000_000,
            owner(101, 11, 7),
        );
        socket(
            conn,
            "172.17.0.2",
            40000,
            T0 + 60_000_000,
            owner(202, 12, 7),
        );
        // A socket whose first packet lies 3 s from the flow's start: another flow.
        socket(
            conn,
            "172.17.0.2",
            40001,
            T0 + 33_000_000,
            owner(303, 12, 7),
        );
        // The third container's socket: cgroup 1 is the root, shared by every such task.
        socket(conn, "172.18.0.2", 40002, T0 + 80_000_000, owner(404, 1, 9));
        // Two sockets of one tuple 1.5 s apart, both within the window of a flow between them.
        socket(
            conn,
            "172.17.0.3",
            40003,
            T0 + 25_000_000,
            owner(505, 11, 7),
        );
        socket(
            conn,
            "172.17.0.3",
            40003,
            T0 + 26_500_000,
            owner(606, 11, 7),
        );
        // Executions: a process is the one a socket names when their starts lie less than
        // 50 ms apart (the socket rows say T0). Pid 202's is another process of that pid.
        for (pid, exe, start) in [
            (101, "/usr/bin/curl", 49_999),
            (202, "/usr/bin/wget", 50_000),
        ] {
            conn.execute(
                &format!(
                    "INSERT INTO process_events VALUES ({}, 1, {pid}, {pid}, 1, 0, 'curl', '{exe}',
                     false, ['{exe}'], false, {}, 11, 7, 8, NULL)",
                    s(T0 + 15_000_000),
                    s(T0 + start)
                ),
                [],
            )
            .unwrap();
        }
    }

    #[test]
    fn flows_are_named_by_tuple_time_and_cgroup_and_the_rest_says_why_not() {
        on_fixture("attr", flows_are_named);
    }

    fn flows_are_named(conn: &Connection) {
        let mut flows = [
            flow("172.17.0.2", 40000, "192.0.2.9", 443, T0 + 20_000_500),
            flow("172.17.0.2", 40000, "192.0.2.9", 443, T0 + 60_000_100),
            flow("172.17.0.2", 40001, "192.0.2.9", 443, T0 + 30_000_000),
            flow("10.0.0.5", 50000, "192.0.2.9", 443, T0 + 100_500_000),
            flow("10.0.0.5", 50001, "192.0.2.9", 443, T0 + 5_000_000),
            flow("172.18.0.2", 40002, "192.0.2.9", 443, T0 + 80_000_200),
            flow("172.17.0.3", 40003, "192.0.2.9", 443, T0 + 26_000_000),
            flow("172.17.0.3", 40003, "192.0.2.9", 443, T0 + 25_600_000),
        ];
        attribute(conn, flows.iter_mut()).unwrap();
        // Status, pid, exe, container.
        type Named<'a> = (OwnerStatus, Option<u32>, Option<&'a str>, Option<&'a str>);
        let got: Vec<Named> = flows
            .iter()
            .map(|f| {
                let a = f.attribution.as_ref().unwrap();
                (a.status, a.pid, a.exe.as_deref(), a.container.as_deref())
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    OwnerStatus::Local,
                    Some(101),
                    Some("/usr/bin/curl"),
                    Some("first")
                ),
                (OwnerStatus::Local, Some(202), None, Some("second")),
                // Watched, no socket within the window: not from this host.
                (OwnerStatus::None, None, None, None),
                // In an eBPF gap: unknown, never a guess.
                (OwnerStatus::Unknown, None, None, None),
                // Before the socket programs ran.
                (OwnerStatus::Unknown, None, None, None),
                // No cgroup of its own: its network namespace, within its run.
                (OwnerStatus::Local, Some(404), None, Some("third")),
                // The nearer socket, after the flow's start or before it.
                (OwnerStatus::Local, Some(606), None, Some("first")),
                (OwnerStatus::Local, Some(505), None, Some("first")),
            ]
        );
    }

    #[test]
    fn without_socket_rows_near_the_flows_the_coverage_alone_answers_the_same() {
        on_fixture("attr-fast", coverage_alone_answers);
    }

    fn coverage_alone_answers(conn: &Connection) {
        let statuses = |at: &[i64], joined: bool| -> Vec<OwnerStatus> {
            let mut flows: Vec<FlowRow> = at
                .iter()
                .map(|t| flow("10.0.0.5", 50000, "192.0.2.9", 443, T0 + t))
                .collect();
            attribute_as(conn, flows.iter_mut(), joined).unwrap();
            flows
                .iter()
                .map(|f| f.attribution.as_ref().unwrap().status)
                .collect()
        };
        use OwnerStatus::{None as NotLocal, Unknown};
        for (at, want) in [
            // Watched, no socket within 2 s: forwarded.
            (vec![40_000_000, 41_000_000], vec![NotLocal, NotLocal]),
            // Within 2 s of the eBPF gap: unknown.
            (
                vec![97_000_000, 99_000_000, 102_500_000],
                vec![NotLocal, Unknown, Unknown],
            ),
            // Before the socket programs' coverage began (with its 2 s of slack).
            (
                vec![5_000_000, 11_000_000, 12_000_000],
                vec![Unknown, Unknown, NotLocal],
            ),
        ] {
            let first = T0 + at[0] - WINDOW_US;
            let last = T0 + at[at.len() - 1] + WINDOW_US;
            assert!(!Watch::read(conn, first, last).unwrap().sockets, "{at:?}");
            assert_eq!(statuses(&at, false), want, "{at:?}");
            assert_eq!(statuses(&at, true), want, "{at:?}");
        }
    }
}
