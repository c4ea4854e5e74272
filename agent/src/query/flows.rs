//! Listing flows with filters on addresses, ports, protocol and a time window.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use duckdb::types::Value;
use duckdb::{Connection, Row};
use serde::{Deserialize, Serialize};

use super::QueryError;
use super::proto::Proto;
use crate::pipeline::clock::rfc3339_us;
use crate::pipeline::flow::{Addr, proto_name};

/// One flow as shown to operators.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowRow {
    /// The internal client.
    pub internal_ip: String,
    /// The client's source port (ICMP id for ICMP).
    pub internal_port: u16,
    /// The public address after NAT.
    pub public_ip: String,
    /// The public port after NAT.
    pub public_port: u16,
    /// Destination address.
    pub dst_ip: String,
    /// Destination port (null for ICMP).
    pub dst_port: Option<u16>,
    /// tcp, udp, icmp, ...
    pub proto: String,
    /// Flow start, RFC 3339 UTC (null if the trail never saw it start).
    pub start: Option<String>,
    /// Flow end, RFC 3339 UTC, null while open.
    pub end: Option<String>,
    /// The end is only bounded (the flow ended while the trail was not watching).
    pub end_inexact: bool,
    /// For inexact ends: alive until at least this instant.
    pub end_not_before: Option<String>,
    /// Bytes client → destination.
    pub bytes_out: Option<u64>,
    /// Packets client → destination.
    pub packets_out: Option<u64>,
    /// Bytes destination → client.
    pub bytes_in: Option<u64>,
    /// Packets destination → client.
    pub packets_in: Option<u64>,
    /// The kernel's conntrack id while the flow is recent; sealed hours do not keep it (0,
    /// and absent from JSON).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conntrack_id: u32,
    /// Conntrack zone.
    pub zone: u16,
    /// Found by a table dump (agent start or resync) rather than a NEW event.
    pub found_by_dump: bool,
    /// Still open as the trail last knew it.
    pub open: bool,
    /// Start in µs since the epoch (for ordering).
    #[serde(skip)]
    pub start_us: Option<i64>,
    /// End in µs since the epoch (for ordering).
    #[serde(skip)]
    pub end_us: Option<i64>,
    /// Which process and container opened it (absent when not asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<super::attribution::Attribution>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A flow's identity in the trail, for the follow-up that finds where an interim slice's
/// flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    hour: Option<i32>,
    interim: bool,
    proto: u8,
    zone: u16,
    public: (Addr, u16),
    src: (Addr, u16),
    dst: (Addr, u16),
    start_ms: Option<i64>,
}

/// The columns every slice query selects, in the order `read_candidate` reads them.
const SELECT: &str =
    "start_ms, end_ms, end_lo_ms, flags, hour, proto, nt_addr(src4, src6), src_port,
     nt_addr(pub4, pub6), pub_port, nt_addr(dst4, dst6), dst_port, ct_id, zone,
     bytes_out, packets_out, bytes_in, packets_in";

fn read_candidate(r: &Row<'_>) -> duckdb::Result<(FlowRow, Identity)> {
    let start_ms: Option<i64> = r.get(0)?;
    let end_ms: Option<i64> = r.get(1)?;
    let end_lo_ms: Option<i64> = r.get(2)?;
    let flags: u8 = r.get(3)?;
    let hour: Option<i32> = r.get(4)?;
    let proto: u8 = r.get(5)?;
    let finished = flags & 1 == 1;
    let open = flags & 8 == 8;
    let interim = !finished && !open;
    let end_us = end_ms.filter(|_| finished).map(|e| e * 1_000);
    // An interim slice whose flow's end was not found: alive until at least its hour's end.
    let not_before = if interim {
        hour.map(|h| crate::store::trail::hour_end_ms(h) * 1_000)
    } else {
        end_lo_ms.map(|e| e * 1_000)
    };
    let id = Identity {
        hour,
        interim,
        proto,
        zone: r.get(13)?,
        public: (Addr(r.get(8)?), r.get(9)?),
        src: (Addr(r.get(6)?), r.get(7)?),
        dst: (Addr(r.get(10)?), r.get(11)?),
        start_ms,
    };
    let start_us = start_ms.map(|s| s * 1_000);
    let flow = FlowRow {
        start_us,
        end_us,
        start: start_us.map(rfc3339_us),
        end: end_us.map(rfc3339_us),
        end_not_before: not_before.map(rfc3339_us),
        end_inexact: flags & 4 == 4,
        found_by_dump: flags & 2 == 2,
        open,
        proto: proto_name(proto),
        internal_ip: id.src.0.to_string(),
        internal_port: id.src.1,
        public_ip: id.public.0.to_string(),
        public_port: id.public.1,
        dst_ip: id.dst.0.to_string(),
        dst_port: if matches!(proto, 1 | 58) {
            None
        } else {
            Some(id.dst.1)
        },
        conntrack_id: r.get::<_, Option<u32>>(12)?.unwrap_or(0),
        zone: id.zone,
        bytes_out: r.get(14)?,
        packets_out: r.get(15)?,
        bytes_in: r.get(16)?,
        packets_in: r.get(17)?,
        attribution: None,
    };
    Ok((flow, id))
}

/// Conditions on the trail's flows, written once for the slice tables (`pub4`, `src6`, ...)
/// and once for the open-flow tables (`reply_dst`, `orig_src`, ...). Values are parameters,
/// so that one lookup's SQL is the next one's, and the connection's cached plan serves it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Conditions {
    slices: String,
    slice_params: Vec<Value>,
    open: String,
    open_params: Vec<Value>,
}

impl Conditions {
    fn both(&mut self, slices: &str, open: &str, v: Value) {
        self.slices.push_str(" AND ");
        self.slices.push_str(slices);
        self.slice_params.push(v.clone());
        self.open.push_str(" AND ");
        self.open.push_str(open);
        self.open_params.push(v);
    }

    fn addr(&mut self, prefix: &str, open_col: &str, a: Addr) {
        if a.is_v4() {
            self.slices.push_str(&format!(" AND {prefix}4 = ?"));
            self.slice_params.push(Value::UInt(a.0 as u32));
        } else {
            self.slices.push_str(&format!(" AND {prefix}6 = ?"));
            self.slice_params.push(Value::UHugeInt(a.0));
        }
        self.open.push_str(&format!(" AND {open_col} = ?"));
        self.open_params.push(Value::UHugeInt(a.0));
    }

    /// The public address (after source NAT).
    pub(crate) fn public_ip(&mut self, ip: IpAddr) {
        self.addr("pub", "reply_dst", Addr::from(ip));
    }

    /// The public port.
    pub(crate) fn public_port(&mut self, p: u16) {
        self.both("pub_port = ?", "reply_dport = ?", Value::USmallInt(p));
    }

    /// The internal client.
    pub(crate) fn internal_ip(&mut self, ip: IpAddr) {
        self.addr("src", "orig_src", Addr::from(ip));
    }

    /// The destination address.
    pub(crate) fn dst_ip(&mut self, ip: IpAddr) {
        self.addr("dst", "orig_dst", Addr::from(ip));
    }

    /// The destination port.
    pub(crate) fn dst_port(&mut self, p: u16) {
        self.both("dst_port = ?", "orig_dport = ?", Value::USmallInt(p));
    }

    /// Internal, public or destination port.
    pub(crate) fn any_port(&mut self, p: u16) {
        self.slices
            .push_str(" AND (src_port = ? OR pub_port = ? OR dst_port = ?)");
        self.open
            .push_str(" AND (orig_sport = ? OR reply_dport = ? OR orig_dport = ?)");
        for _ in 0..3 {
            self.slice_params.push(Value::USmallInt(p));
            self.open_params.push(Value::USmallInt(p));
        }
    }

    /// The protocol.
    pub(crate) fn proto(&mut self, p: Proto) {
        let list = p.numbers_sql();
        self.slices.push_str(&format!(" AND proto IN ({list})"));
        self.open.push_str(&format!(" AND proto IN ({list})"));
    }

    /// Slices of these hours only (open flows have no hour).
    pub(crate) fn hours(&mut self, from: Option<i32>, to: Option<i32>) {
        if let Some(h) = from {
            self.slices.push_str(" AND hour >= ?");
            self.slice_params.push(Value::Int(h));
        }
        if let Some(h) = to {
            self.slices.push_str(" AND hour <= ?");
            self.slice_params.push(Value::Int(h));
        }
    }

    fn identity(id: &Identity) -> Conditions {
        let mut c = Conditions::default();
        c.public_ip(id.public.0.to_ip());
        c.public_port(id.public.1);
        c.internal_ip(id.src.0.to_ip());
        c.both("src_port = ?", "orig_sport = ?", Value::USmallInt(id.src.1));
        c.dst_ip(id.dst.0.to_ip());
        c.dst_port(id.dst.1);
        c.both("proto = ?", "proto = ?", Value::UTinyInt(id.proto));
        c.both("zone = ?", "zone = ?", Value::USmallInt(id.zone));
        if let Some(s) = id.start_ms {
            c.slices.push_str(" AND start_ms = ?");
            c.slice_params.push(Value::BigInt(s));
            c.open.push_str(" AND start_us // 1000 = ?");
            c.open_params.push(Value::BigInt(s));
        }
        c
    }

    /// The parameters of a query that reads flow_trail, trail_recent, open_journal and
    /// open_flows in that order, then `tail`.
    fn params(&self, tail: &[Value]) -> Vec<Value> {
        let mut v = Vec::new();
        v.extend(self.slice_params.iter().cloned());
        v.extend(self.slice_params.iter().cloned());
        v.extend(self.open_params.iter().cloned());
        v.extend(self.open_params.iter().cloned());
        v.extend(tail.iter().cloned());
        v
    }
}

/// Runs `sql` (cached on the connection) with `params`, reading flows.
fn run(
    conn: &Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<(FlowRow, Identity)>, QueryError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(QueryError::db("preparing the flow query"))?;
    stmt.query_map(duckdb::params_from_iter(params.iter()), read_candidate)
        .map_err(QueryError::db("running the flow query"))?
        .collect::<Result<_, _>>()
        .map_err(QueryError::db("reading flow rows"))
}

/// An open flow's columns in the order `read_candidate` reads them.
const OPEN_SELECT: &str = "start_us // 1000, NULL::BIGINT, NULL::BIGINT,
     (8 | CASE WHEN by_dump THEN 2 ELSE 0 END)::UTINYINT, NULL::INTEGER, proto, orig_src,
     orig_sport, reply_dst, reply_dport, orig_dst, orig_dport, ct_id, zone,
     NULL::UBIGINT, NULL::UBIGINT, NULL::UBIGINT, NULL::UBIGINT";

/// The open flows (checkpoint and journal) matching `cond` in the slice layout: the view
/// `open_slices` with the conditions on the tables' own columns, so that DuckDB's min/max
/// per row group prune the checkpoint (sorted by public address and port).
fn open_slices(cond: &str) -> String {
    format!(
        "SELECT NULL::INTEGER AS hour, (8 | CASE WHEN by_dump THEN 2 ELSE 0 END)::UTINYINT AS flags,
                proto, zone, nt_v4(reply_dst) AS pub4, nt_v6(reply_dst) AS pub6, reply_dport AS pub_port,
                nt_v4(orig_src) AS src4, nt_v6(orig_src) AS src6, orig_sport AS src_port,
                nt_v4(orig_dst) AS dst4, nt_v6(orig_dst) AS dst6, orig_dport AS dst_port,
                NULL::UINTEGER AS dnat4, NULL::UHUGEINT AS dnat6, NULL::USMALLINT AS dnat_port,
                start_us // 1000 AS start_ms, NULL::BIGINT AS end_ms, NULL::BIGINT AS end_lo_ms,
                NULL::UBIGINT AS packets_out, NULL::UBIGINT AS bytes_out,
                NULL::UBIGINT AS packets_in, NULL::UBIGINT AS bytes_in, ct_id, NULL::UBIGINT AS seq
         FROM (SELECT * FROM open_journal WHERE true {cond}
               UNION ALL BY NAME SELECT * FROM open_flows WHERE true {cond})"
    )
}

/// The condition that a slice's interval meets `[lo_ms, hi_ms]`, and its parameters.
fn window(lo_ms: Option<i64>, hi_ms: Option<i64>) -> (String, Vec<Value>) {
    let mut window = String::new();
    let mut params = Vec::new();
    if let Some(hi) = hi_ms {
        window.push_str(" AND coalesce(start_ms, end_ms) <= ?");
        params.push(Value::BigInt(hi));
    }
    if let Some(lo) = lo_ms {
        window.push_str(
            " AND coalesce(CASE WHEN flags & 1 = 1 THEN end_ms END,
                           CASE WHEN flags & 8 = 8 THEN 9223372036854775807 END,
                           (hour + 1)::BIGINT * 3600000) >= ?",
        );
        params.push(Value::BigInt(lo));
    }
    (window, params)
}

/// The flows matching `cond` whose interval meets `[lo_ms, hi_ms]`, one per flow, in no
/// order: `matching` for a lookup of a few rows. Three small cached queries (sealed hours,
/// recent slices, open flows) and the choice of each flow's best row here, which costs a
/// lookup less than one query with a window function over their union.
pub(crate) fn covering(
    conn: &Connection,
    cond: &Conditions,
    lo_ms: i64,
    hi_ms: i64,
) -> Result<Vec<FlowRow>, QueryError> {
    let (window, tail) = window(Some(lo_ms), Some(hi_ms));
    let (s, o) = (&cond.slices, &cond.open);
    // One statement (its fixed cost once), no window function: the rows are few.
    let sql = format!(
        "SELECT {SELECT} FROM flow_trail WHERE true {s} {window}
         UNION ALL SELECT {SELECT} FROM trail_recent WHERE true {s} {window}
         UNION ALL SELECT {OPEN_SELECT} FROM open_flows WHERE true {o} AND start_us // 1000 <= ?
         UNION ALL SELECT {OPEN_SELECT} FROM open_journal WHERE true {o} AND start_us // 1000 <= ?"
    );
    let mut params = Vec::new();
    for _ in 0..2 {
        params.extend(cond.slice_params.iter().cloned());
        params.extend(tail.iter().cloned());
    }
    for _ in 0..2 {
        params.extend(cond.open_params.iter().cloned());
        params.push(Value::BigInt(hi_ms));
    }
    let rows = run(conn, &sql, &params)?;
    // Per flow: its final slice, else its open record, else its exact-ended, else newest.
    let rank = |id: &Identity, f: &FlowRow| {
        (
            f.end_us.is_some() && !id.interim,
            f.open,
            !f.end_inexact,
            id.hour,
        )
    };
    let mut best: Vec<(FlowRow, Identity)> = Vec::new();
    // A flow's identity, as the views partition by it (a flow whose start the trail never
    // saw is told apart by its end).
    let key = |i: &Identity, f: &FlowRow| {
        (
            i.proto,
            i.zone,
            i.src,
            i.dst,
            i.start_ms,
            i.start_ms.map_or(f.end_us, |_| None),
        )
    };
    for (f, id) in rows {
        match best.iter_mut().find(|(bf, b)| key(b, bf) == key(&id, &f)) {
            Some(slot) if rank(&id, &f) > rank(&slot.1, &slot.0) => *slot = (f, id),
            Some(_) => {}
            None => best.push((f, id)),
        }
    }
    let mut out = Vec::with_capacity(best.len());
    for (flow, id) in best {
        out.push(if id.interim {
            resolve(conn, flow, &id)?
        } else {
            flow
        });
    }
    Ok(out)
}

/// Every flow matching `cond` whose interval meets `[lo_ms, hi_ms]` (either side open), one
/// row per flow (its final slice, else its open record, else its newest interim slice, whose
/// end is then looked up in the hours after), ordered by `order`, at most `limit`.
pub(crate) fn matching(
    conn: &Connection,
    cond: &Conditions,
    lo_ms: Option<i64>,
    hi_ms: Option<i64>,
    order: &str,
    limit: Option<usize>,
) -> Result<Vec<FlowRow>, QueryError> {
    let (window, mut tail) = window(lo_ms, hi_ms);
    let limit_sql = if limit.is_some() { " LIMIT ?" } else { "" };
    if let Some(n) = limit {
        tail.push(Value::UBigInt(n as u64));
    }
    let s = &cond.slices;
    let open = open_slices(&cond.open);
    let sql = format!(
        "SELECT {SELECT} FROM (
            SELECT * FROM flow_trail WHERE true {s}
            UNION ALL SELECT * FROM trail_recent WHERE true {s}
            UNION ALL {open})
         WHERE true {window}
         QUALIFY row_number() OVER (
            PARTITION BY proto, zone, src4, src6, src_port, dst4, dst6, dst_port,
                         coalesce(start_ms, -end_ms)
            ORDER BY flags & 1 DESC, flags & 8 DESC, flags & 4, hour DESC) = 1
         ORDER BY {order}{limit_sql}"
    );
    let rows = run(conn, &sql, &cond.params(&tail))?;
    let mut out = Vec::with_capacity(rows.len());
    for (flow, id) in rows {
        out.push(if id.interim {
            resolve(conn, flow, &id)?
        } else {
            flow
        });
    }
    Ok(out)
}

/// How far after an interim slice its flow's final slice is looked for.
const RESOLVE_HOURS: i32 = 24 * 7;

/// The sealed hours after an interim slice's hour searched in turn for its flow's final
/// slice, as offsets (first, last). A search costs a statement's fixed cost (3-5 ms here)
/// plus about one row group an hour (0.07 ms): one statement covers the flows that end
/// within a day and a half (every flow of the generated trails, 12-hour ones included), a
/// second the rest of the week.
const RESOLVE_STEPS: [(i32, i32); 2] = [(1, 36), (37, RESOLVE_HOURS)];

/// The flow of an interim slice as the trail knows it later: its final slice in a later hour,
/// or its open record. A flow alive past the search keeps its interim form.
fn resolve(conn: &Connection, interim: FlowRow, id: &Identity) -> Result<FlowRow, QueryError> {
    let Some(hour) = id.hour else {
        return Ok(interim);
    };
    for (step, (first, last)) in RESOLVE_STEPS.into_iter().enumerate() {
        let mut sealed = Conditions::identity(id);
        sealed.hours(Some(hour + first), Some(hour + last));
        let s = &sealed.slices;
        let mut params: Vec<Value> = sealed.slice_params.clone();
        let sql = if step == 0 {
            // The unsealed hours and the open flows, whatever their hour, once: the first
            // search reads them with the next sealed hour.
            let mut rest = Conditions::identity(id);
            rest.hours(Some(hour + 1), Some(hour + RESOLVE_HOURS));
            let (r, o) = (&rest.slices, &rest.open);
            params.extend(rest.slice_params.iter().cloned());
            params.extend(rest.open_params.iter().cloned());
            params.extend(rest.open_params.iter().cloned());
            format!(
                "SELECT * FROM (
                    SELECT {SELECT} FROM flow_trail WHERE flags & 1 = 1 {s}
                    UNION ALL SELECT {SELECT} FROM trail_recent WHERE flags & 1 = 1 {r}
                    UNION ALL SELECT {OPEN_SELECT} FROM open_flows WHERE true {o}
                    UNION ALL SELECT {OPEN_SELECT} FROM open_journal WHERE true {o})
                 ORDER BY flags & 1 DESC, flags & 4 LIMIT 1"
            )
        } else {
            format!(
                "SELECT {SELECT} FROM flow_trail WHERE flags & 1 = 1 {s}
                 ORDER BY flags & 4 LIMIT 1"
            )
        };
        if let Some((flow, _)) = run(conn, &sql, &params)?.into_iter().next() {
            return Ok(flow);
        }
    }
    Ok(interim)
}

/// Filters of `nattrail flows`.
#[derive(Debug, Clone, Default)]
pub struct FlowsQuery {
    /// Internal client address.
    pub internal_ip: Option<IpAddr>,
    /// Public (translated) address.
    pub public_ip: Option<IpAddr>,
    /// Internal, public or destination port.
    pub port: Option<u16>,
    /// Public port.
    pub public_port: Option<u16>,
    /// Destination address.
    pub dst_ip: Option<IpAddr>,
    /// Destination port.
    pub dst_port: Option<u16>,
    /// Protocol.
    pub proto: Option<Proto>,
    /// Flows alive at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Flows started at or before this instant.
    pub until: Option<DateTime<Utc>>,
    /// At most this many rows.
    pub limit: usize,
}

/// Runs the listing, oldest start first.
pub fn flows(conn: &Connection, q: &FlowsQuery) -> Result<Vec<FlowRow>, QueryError> {
    use crate::store::trail::hour_of;
    let mut c = Conditions::default();
    if let Some(ip) = q.internal_ip {
        c.internal_ip(ip);
    }
    if let Some(ip) = q.public_ip {
        c.public_ip(ip);
    }
    if let Some(ip) = q.dst_ip {
        c.dst_ip(ip);
    }
    if let Some(p) = q.public_port {
        c.public_port(p);
    }
    if let Some(p) = q.dst_port {
        c.dst_port(p);
    }
    if let Some(p) = q.port {
        c.any_port(p);
    }
    if let Some(p) = q.proto {
        c.proto(p);
    }
    // A flow alive at `since` has a slice in since's hour or later; one started by `until`
    // has a slice in until's hour or earlier (its final one, or the interim one of that hour).
    let lo = q.since.map(|t| t.timestamp_micros().div_euclid(1_000));
    let hi = q.until.map(|t| t.timestamp_micros().div_euclid(1_000));
    c.hours(lo.map(hour_of), hi.map(hour_of));
    matching(
        conn,
        &c,
        lo,
        hi,
        "start_ms NULLS FIRST, src_port, pub_port",
        Some(q.limit),
    )
}
