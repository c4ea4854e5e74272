//! Listing flows with filters on addresses, ports, protocol and a time window.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use duckdb::types::Value;
use duckdb::{Connection, Row};
use serde::{Deserialize, Serialize};

use super::QueryError;
use super::coverage::{Coverage, Partition};
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
    /// A sealed slice's destination until `fill_destinations` reads it.
    dst_id: Option<u32>,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
    flags: u8,
}

/// The columns every slice query selects, in the order `read_candidate` reads them: the
/// table's own columns, so that binding the statement expands no macro. The last is a sealed
/// slice's index into its hour's destinations (`fill_destinations` reads them). Computed
/// columns are named: DuckDB names an unnamed one by printing it, which costs a CLI lookup
/// the building of its keyword table (see `Watch::read` in attribution).
const SELECT: &str = "hour, flags, proto, zone, src4, src6, src_port, pub4, pub6, pub_port,
     dst4, dst6, dst_port, start_ms, end_ms, end_lo_ms, bytes_out, packets_out, bytes_in,
     packets_in, ct_id, NULL::UINTEGER AS dst_id";

/// `SELECT` from the sealed hours, without their destinations: a join with the dictionary
/// costs a lookup more than a second statement for the few rows found.
const SEALED_SELECT: &str = "SELECT hour, flags, proto, zone, src4, src6, src_port, pub4, pub6,
     pub_port, NULL::UINTEGER AS dst4, NULL::UHUGEINT AS dst6, NULL::USMALLINT AS dst_port,
     start_ms, end_ms, end_lo_ms, bytes_out, packets_out, bytes_in, packets_in,
     NULL::UINTEGER AS ct_id, dst_id FROM";

/// `SELECT`s of the sealed slices of public `ip:port` in the hours of `parts` matching
/// `extra` (SQL on the slice's columns), joined by UNION ALL, and their parameters.
fn sealed_parts(
    parts: &[Partition],
    ip: IpAddr,
    port: u16,
    extra: &str,
) -> (Vec<String>, Vec<Value>) {
    let mut sql = Vec::new();
    let mut params = Vec::new();
    for p in parts {
        let (c, v) = slice_condition(p.first, p.last, ip, port);
        sql.push(format!("{SEALED_SELECT} {} WHERE {c}{extra}", p.sealed));
        params.extend(v);
    }
    (sql, params)
}

/// `SELECT` from an open-flow table (its addresses are 16-byte, IPv4 mapped).
/// Its computed columns are named as `SELECT`'s: DuckDB names the columns of every arm of a
/// UNION, and an unnamed one makes it build its keyword table (see `SELECT`).
const OPEN_SELECT: &str = "NULL::INTEGER AS hour,
     CASE WHEN by_dump THEN 10 ELSE 8 END::UTINYINT AS flags, proto, zone,
     NULL::UINTEGER AS src4, orig_src, orig_sport, NULL::UINTEGER AS pub4, reply_dst,
     reply_dport, NULL::UINTEGER AS dst4, orig_dst, orig_dport, start_us // 1000 AS start_ms,
     NULL::BIGINT AS end_ms, NULL::BIGINT AS end_lo_ms, NULL::UBIGINT AS bytes_out,
     NULL::UBIGINT AS packets_out, NULL::UBIGINT AS bytes_in, NULL::UBIGINT AS packets_in, ct_id,
     NULL::UINTEGER AS dst_id";

/// An address stored as an IPv4 column beside a 16-byte one (the other NULL).
fn read_addr(r: &Row<'_>, v4: usize) -> duckdb::Result<Addr> {
    Ok(match r.get::<_, Option<u128>>(v4 + 1)? {
        Some(a) => Addr(a),
        None => Addr::from_v4(r.get::<_, u32>(v4)?.to_be_bytes()),
    })
}

fn read_candidate(r: &Row<'_>) -> duckdb::Result<(FlowRow, Identity)> {
    let hour: Option<i32> = r.get(0)?;
    let flags: u8 = r.get(1)?;
    let proto: u8 = r.get(2)?;
    let start_ms: Option<i64> = r.get(13)?;
    let end_ms: Option<i64> = r.get(14)?;
    let end_lo_ms: Option<i64> = r.get(15)?;
    let dst_id: Option<u32> = r.get(21)?;
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
        zone: r.get(3)?,
        public: (read_addr(r, 7)?, r.get(9)?),
        src: (read_addr(r, 4)?, r.get(6)?),
        dst: match dst_id {
            Some(_) => (Addr(0), 0),
            None => (read_addr(r, 10)?, r.get(12)?),
        },
        dst_id,
        start_ms,
        end_ms,
        flags,
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
        conntrack_id: r.get::<_, Option<u32>>(20)?.unwrap_or(0),
        zone: id.zone,
        bytes_out: r.get(16)?,
        packets_out: r.get(17)?,
        bytes_in: r.get(18)?,
        packets_in: r.get(19)?,
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
    /// The hours `hours` bounds the slices to.
    span: (Option<i32>, Option<i32>),
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

    /// The internal, public or destination address.
    pub(crate) fn any_ip(&mut self, ip: IpAddr) {
        let a = Addr::from(ip);
        let (cols, v) = if a.is_v4() {
            (
                "(src4 = ? OR pub4 = ? OR dst4 = ?)",
                Value::UInt(a.0 as u32),
            )
        } else {
            ("(src6 = ? OR pub6 = ? OR dst6 = ?)", Value::UHugeInt(a.0))
        };
        self.slices.push_str(" AND ");
        self.slices.push_str(cols);
        self.open
            .push_str(" AND (orig_src = ? OR reply_dst = ? OR orig_dst = ?)");
        for _ in 0..3 {
            self.slice_params.push(v.clone());
            self.open_params.push(Value::UHugeInt(a.0));
        }
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
        let list = p
            .numbers()
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.slices.push_str(&format!(" AND proto IN ({list})"));
        self.open.push_str(&format!(" AND proto IN ({list})"));
    }

    /// Slices of these hours only (open flows have no hour). Written before the other
    /// conditions, whenever it is called: DuckDB checks zone maps in the order of the filters
    /// (see `slice_condition`).
    pub(crate) fn hours(&mut self, from: Option<i32>, to: Option<i32>) {
        self.span = (from, to);
        let (sql, params) = bounds("hour", from.map(Value::Int), to.map(Value::Int));
        self.slices.insert_str(0, &sql);
        self.slice_params.splice(0..0, params);
    }

    /// The parameters of a query that reads `sealed` sealed tables, trail_recent,
    /// open_journal and open_flows in that order, then `tail`.
    pub(crate) fn params(&self, sealed: usize, tail: &[Value]) -> Vec<Value> {
        let mut v = Vec::new();
        for _ in 0..=sealed {
            v.extend(self.slice_params.iter().cloned());
        }
        v.extend(self.open_params.iter().cloned());
        v.extend(self.open_params.iter().cloned());
        v.extend(tail.iter().cloned());
        v
    }
}

/// `col` between `lo` and `hi`, either side open: the conditions (each after " AND ") and
/// their parameters.
pub(crate) fn bounds(col: &str, lo: Option<Value>, hi: Option<Value>) -> (String, Vec<Value>) {
    let mut sql = String::new();
    if lo.is_some() {
        sql.push_str(&format!(" AND {col} >= ?"));
    }
    if hi.is_some() {
        sql.push_str(&format!(" AND {col} <= ?"));
    }
    (sql, lo.into_iter().chain(hi).collect())
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

/// The open flows (checkpoint and journal) matching `cond` in the slice layout: the view
/// `open_slices` with the conditions on the tables' own columns, so that DuckDB's min/max
/// per row group prune the checkpoint (sorted by public address and port). A flow that ended
/// since its record was written is left out: its final slice, in trail_recent with a sequence
/// number from the checkpoint's on (every seal checkpoints first), says so, and a window or
/// hours that leave that slice out would otherwise show the flow open. (The checkpoint's
/// number is joined, not a scalar subquery: DuckDB plans one as an aggregate, whose name it
/// prints, which makes a CLI process build its keyword table; see `SELECT`.)
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
         FROM (SELECT o.* FROM (SELECT * FROM open_journal WHERE true {cond}
                                UNION ALL BY NAME SELECT * FROM open_flows WHERE true {cond}) o
               ANTI JOIN (SELECT r.ct_id, r.start_ms, r.src_port FROM trail_recent r,
                                 (SELECT next_seq FROM open_flows_checkpoint
                                  ORDER BY 1 DESC LIMIT 1) c
                          WHERE r.flags & 1 = 1 AND r.seq >= c.next_seq) f
               ON f.ct_id = o.ct_id AND f.start_ms = o.start_us // 1000
                  AND f.src_port = o.orig_sport)"
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

/// The public endpoint a lookup asks about, and what else it must match.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoint {
    /// Public address.
    pub(crate) ip: IpAddr,
    /// Public port.
    pub(crate) port: u16,
    /// Only this protocol.
    pub(crate) proto: Option<Proto>,
    /// Only this destination address.
    pub(crate) dst_ip: Option<IpAddr>,
    /// Only this destination port.
    pub(crate) dst_port: Option<u16>,
}

/// The condition on a slice table's hours `first..=last` and public address and port, and
/// its parameters. The hours come first: DuckDB checks a row group's zone maps in the order
/// the filters are written and stops at the first that rules it out, loading each filtered
/// column's metadata as it goes; the other hours' row groups of a day table then cost their
/// `hour` column's only (a cold CLI lookup's first statement: 8.5 ms against 12.2 ms,
/// medians of 25).
fn slice_condition(first: i32, last: i32, ip: IpAddr, port: u16) -> (String, Vec<Value>) {
    let (c, p) = endpoint_condition(ip, port);
    let mut params = vec![Value::Int(first), Value::Int(last)];
    params.extend(p);
    (format!("hour BETWEEN ? AND ? AND {c}"), params)
}

/// The condition on a slice table's public address and port, and its parameters.
fn endpoint_condition(ip: IpAddr, port: u16) -> (String, Vec<Value>) {
    let a = Addr::from(ip);
    let (col, v) = if a.is_v4() {
        ("pub4", Value::UInt(a.0 as u32))
    } else {
        ("pub6", Value::UHugeInt(a.0))
    };
    (
        format!("{col} = ? AND pub_port = ?"),
        vec![v, Value::USmallInt(port)],
    )
}

/// The parameters of `reply_dst = ? AND reply_dport = ?` on an open-flow table.
fn open_params(ip: IpAddr, port: u16) -> Vec<Value> {
    vec![Value::UHugeInt(Addr::from(ip).0), Value::USmallInt(port)]
}

/// The flows of public `ep` whose interval meets `[lo_ms, hi_ms]`, one per flow, in no
/// order: for a lookup of a few rows. One statement, with only the tables that can hold
/// them (`cov` says which), and conditions DuckDB prunes row groups with: every statement
/// with parameters is planned again at each execution, and its cost grows with what it
/// reads and computes. The window and the filters are applied here, on the few rows.
pub(crate) fn covering(
    conn: &Connection,
    cov: &Coverage,
    ep: &Endpoint,
    lo_ms: i64,
    hi_ms: i64,
) -> Result<Vec<FlowRow>, QueryError> {
    use crate::store::trail::hour_of;
    let (first, last) = (hour_of(lo_ms), hour_of(hi_ms));
    let mut parts = Vec::new();
    let mut params = Vec::new();
    if let Some(sealed) = cov.sealed_hour.filter(|s| *s >= first) {
        let (sql, p) = sealed_parts(&cov.partitions(first, last.min(sealed)), ep.ip, ep.port, "");
        parts.extend(sql);
        params.extend(p);
    }
    // Sealed hours hold a slice of every flow alive in them (an interim one for a flow open
    // across their end), unless marked.
    if cov.recent_reaches(last) {
        // Every hour and end: the checkpoint in open_flows (and the journal) still holds a
        // flow that ended since, and its final slice, written after them, is here whatever
        // its hour and end (every seal checkpoints first). Read only to `last` and from
        // `lo_ms`, a flow asked about before it ended, or in the next hour after it ended
        // before the next checkpoint, came back open, from that stale record. trail_recent
        // holds an hour or two (and a sealed hour's late slices): no hour bound costs nothing.
        let (c, p) = endpoint_condition(ep.ip, ep.port);
        parts.push(format!("SELECT {SELECT} FROM trail_recent WHERE {c}"));
        params.extend(p);
        for table in ["open_flows", "open_journal"] {
            parts.push(format!(
                "SELECT {OPEN_SELECT} FROM {table} WHERE reply_dst = ? AND reply_dport = ?"
            ));
            params.extend(open_params(ep.ip, ep.port));
        }
    }
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows = run(conn, &parts.join(" UNION ALL "), &params)?;
    // An open record (checkpoint or journal) of a flow that has ended since is stale: the
    // flow's final slice from trail_recent (destination inline, unlike a sealed one's) says so.
    let ended: Vec<Identity> = rows
        .iter()
        .filter(|(_, id)| id.flags & 1 == 1 && id.dst_id.is_none())
        .map(|(_, id)| *id)
        .collect();
    rows.retain(|(_, id)| {
        let stale = id.flags & 8 == 8 && ended.iter().any(|e| e.same_start(id, true));
        !stale && ep.proto.is_none_or(|p| p.numbers().contains(&id.proto)) && id.meets(lo_ms, hi_ms)
    });
    // A sealed slice's destination costs a statement (a table scan, about 1 ms here). An
    // interim slice's is needed only to tell its flow from another that shares all but the
    // destination (a socket that sent to two in the same millisecond); such a twin, alive in
    // the same hour, is among these rows: without one, `resolve` reads the destination only
    // if it must show the interim slice itself.
    let twins = rows
        .iter()
        .enumerate()
        .any(|(i, (_, a))| rows[..i].iter().any(|(_, b)| a.same_start(b, false)));
    if twins || ep.dst_ip.is_some() || ep.dst_port.is_some() {
        fill_destinations(conn, cov, &mut rows)?;
    } else {
        rows.sort_by_key(|(_, id)| id.interim);
        let finals = rows.partition_point(|(_, id)| !id.interim);
        fill_destinations(conn, cov, &mut rows[..finals])?;
    }
    let dst_ip = ep.dst_ip.map(Addr::from);
    let wanted = |id: &Identity| {
        dst_ip.is_none_or(|a| id.dst.0 == a) && ep.dst_port.is_none_or(|p| id.dst.1 == p)
    };
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
    for (f, id) in rows.into_iter().filter(|(_, id)| wanted(id)) {
        match best.iter_mut().find(|(_, b)| b.same_flow(&id)) {
            Some(slot) if rank(&id, &f) > rank(&slot.1, &slot.0) => *slot = (f, id),
            Some(_) => {}
            None => best.push((f, id)),
        }
    }
    let mut out = Vec::with_capacity(best.len());
    for (flow, id) in best {
        out.push(if id.interim {
            resolve(conn, cov, (flow, id))?
        } else {
            flow
        });
    }
    Ok(out)
}

impl Identity {
    /// Whether the slice's interval meets `[lo_ms, hi_ms]`: it starts (or, start unseen,
    /// ends) by `hi_ms`, and ends (open: never; interim: not before its hour's end) at
    /// `lo_ms` or later.
    fn meets(&self, lo_ms: i64, hi_ms: i64) -> bool {
        let final_ = self.flags & 1 == 1;
        let open = self.flags & 8 == 8;
        let end = if final_ { self.end_ms } else { None }
            .or(open.then_some(i64::MAX))
            .or(self.hour.map(crate::store::trail::hour_end_ms));
        self.start_ms.or(self.end_ms).is_some_and(|s| s <= hi_ms) && end.is_some_and(|e| e >= lo_ms)
    }

    /// The same flow, as the views partition by it (a flow whose start the trail never saw
    /// is told apart by its end).
    fn same_flow(&self, o: &Identity) -> bool {
        let end = |i: &Identity| {
            i.start_ms
                .map_or(i.end_ms.filter(|_| i.flags & 1 == 1), |_| None)
        };
        self.same_start(o, true) && end(self) == end(o)
    }

    /// The same flow as `o`, whose slice is in another hour (with another end or none);
    /// `with_dst` once the destinations are read.
    fn same_start(&self, o: &Identity, with_dst: bool) -> bool {
        (self.proto, self.zone, self.src, self.start_ms) == (o.proto, o.zone, o.src, o.start_ms)
            && (!with_dst || self.dst == o.dst)
    }
}

/// The slices matching `cond` in the hours of its span (the sealed tables of those hours
/// only, trail_recent, the open flows), those meeting `filter` (SQL on the slice columns),
/// then one row per flow: its final slice, else its open record, else its newest interim
/// slice. Returns that SQL, the coverage read and the number of sealed tables it names (for
/// `Conditions::params`).
pub(crate) fn one_row_per_flow(
    conn: &Connection,
    cond: &Conditions,
    filter: &str,
) -> Result<(String, Coverage, usize), QueryError> {
    let s = &cond.slices;
    let open = open_slices(&cond.open);
    // The sealed tables of the hours asked only: each table a scan considers costs its
    // row groups' metadata.
    let cov = Coverage::read(conn)?;
    let parts = cov.partitions(
        cond.span.0.unwrap_or(i32::MIN),
        cond.span.1.unwrap_or(i32::MAX),
    );
    let sealed: String = parts
        .iter()
        .map(|p| {
            format!(
                "SELECT * FROM (SELECT s.hour, s.flags, s.proto, s.zone, s.pub4, s.pub6,
                     s.pub_port, s.src4, s.src6, s.src_port, d.dst4, d.dst6, d.dst_port,
                     s.dnat4, s.dnat6, s.dnat_port, s.start_ms, s.end_ms, s.end_lo_ms,
                     s.packets_out, s.bytes_out, s.packets_in, s.bytes_in,
                     NULL::UINTEGER AS ct_id, NULL::UBIGINT AS seq
                 FROM {} s JOIN {} d ON d.hour = s.hour AND d.id = s.dst_id) WHERE true {s}
                 UNION ALL ",
                p.sealed, p.dst
            )
        })
        .collect();
    let sql = format!(
        "SELECT * FROM (
            {sealed}SELECT * FROM trail_recent WHERE true {s}
            UNION ALL {open})
         WHERE true {filter}
         QUALIFY row_number() OVER (
            PARTITION BY proto, zone, src4, src6, src_port, dst4, dst6, dst_port,
                         coalesce(start_ms, -end_ms)
            ORDER BY flags & 1 DESC, flags & 8 DESC, flags & 4, hour DESC) = 1"
    );
    Ok((sql, cov, parts.len()))
}

/// `order` (columns of `SELECT` by name, each with its modifiers, comma-separated) with each
/// name replaced by its position in `SELECT`: DuckDB binds an ORDER BY on a name by printing
/// it, which makes a CLI process build its keyword table (see `SELECT`); a position it does not
/// print.
fn order_by_position(order: &str) -> Result<String, QueryError> {
    let columns: Vec<&str> = SELECT
        .split(',')
        .map(|c| c.rsplit(' ').next().unwrap_or(c).trim())
        .collect();
    let mut out = Vec::new();
    for item in order.split(',') {
        let item = item.trim();
        let (name, modifiers) = item.split_once(' ').unwrap_or((item, ""));
        let pos = columns
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| QueryError::Invalid(format!("no flow column {name:?} to order by")))?;
        out.push(format!("{} {modifiers}", pos + 1).trim_end().to_string());
    }
    Ok(out.join(", "))
}

/// Every flow matching `cond` whose interval meets `[lo_ms, hi_ms]` (either side open), one
/// row per flow (its final slice, else its open record, else its newest interim slice, whose
/// end is then looked up in the hours after), ordered by `order` (names of `SELECT`'s
/// columns), at most `limit`.
pub(crate) fn matching(
    conn: &Connection,
    cond: &Conditions,
    lo_ms: Option<i64>,
    hi_ms: Option<i64>,
    order: &str,
    limit: Option<usize>,
) -> Result<Vec<FlowRow>, QueryError> {
    let order = order_by_position(order)?;
    let (window, mut tail) = window(lo_ms, hi_ms);
    let limit_sql = if limit.is_some() { " LIMIT ?" } else { "" };
    if let Some(n) = limit {
        tail.push(Value::UBigInt(n as u64));
    }
    let (flows, cov, parts) = one_row_per_flow(conn, cond, &window)?;
    let sql = format!("SELECT {SELECT} FROM ({flows}) ORDER BY {order}{limit_sql}");
    let rows = run(conn, &sql, &cond.params(parts, &tail))?;
    let mut out = Vec::with_capacity(rows.len());
    for (flow, id) in rows {
        out.push(if id.interim {
            resolve(conn, &cov, (flow, id))?
        } else {
            flow
        });
    }
    Ok(out)
}

/// The condition that a slice is its flow's final one (flag 1, `columns::FINAL`). Not
/// `flags & 1`: `&` is a core function, which the CLI's `who` leaves unloaded (see
/// `OpenOptions::builtin_only`).
const FINAL_ONLY: &str = " AND flags % 2 = 1";

/// How far after an interim slice its flow's final slice is looked for.
const RESOLVE_HOURS: i32 = 24 * 7;

/// The sealed hours after an interim slice's hour searched in turn for its flow's final
/// slice when the ends tables cannot tell where it is (hours sealed before schema 14), as
/// offsets (first, last), each step twice the one before. A step costs a
/// statement's planning (1-2 ms here) and each hour it reads about as much again (a row group
/// not yet cached): doubling reads at most twice the hours the flow lived on, in a handful of
/// statements (with 3/12/36 a flow ending 13 hours on read 36 hours, 30-40 ms on the 7-day
/// trail).
const RESOLVE_STEPS: [(i32, i32); 6] = [
    (1, 2),
    (3, 6),
    (7, 14),
    (15, 30),
    (31, 62),
    (63, RESOLVE_HOURS),
];

/// The flow of an interim slice as the trail knows it later: its final slice in a later hour
/// (a copy of it in its start day's ends table), or its open record. A flow alive past the
/// search keeps its interim form. The interim slice's destination may be unread (see
/// `covering`).
fn resolve(
    conn: &Connection,
    cov: &Coverage,
    mut interim: (FlowRow, Identity),
) -> Result<FlowRow, QueryError> {
    let Some(hour) = interim.1.hour else {
        return Ok(interim.0);
    };
    let (ip, port) = (interim.1.public.0.to_ip(), interim.1.public.1);
    // Its final slice (exact end first), else its open record.
    let pick = |interim: &mut (FlowRow, Identity),
                mut rows: Vec<(FlowRow, Identity)>|
     -> Result<Option<FlowRow>, QueryError> {
        rows.retain(|(_, c)| !c.interim && c.same_start(&interim.1, false));
        fill_destinations(conn, cov, &mut rows)?;
        // Candidates with different destinations: the interim slice's own tells them apart.
        if rows.iter().any(|(_, c)| c.dst != rows[0].1.dst) {
            fill_destinations(conn, cov, std::slice::from_mut(interim))?;
        }
        let id = &interim.1;
        Ok(rows
            .into_iter()
            .filter(|(_, c)| id.dst_id.is_some() || c.same_start(id, true))
            .max_by_key(|(f, c)| (c.flags & 1, !f.end_inexact))
            .map(|(f, _)| f))
    };
    // The final slices of the sealed hours `from..=to`.
    let in_hours = |interim: &mut (FlowRow, Identity),
                    from: i32,
                    to: i32|
     -> Result<Option<FlowRow>, QueryError> {
        let (sql, params) = sealed_parts(&cov.partitions(from, to), ip, port, FINAL_ONLY);
        if sql.is_empty() {
            return Ok(None);
        }
        pick(interim, run(conn, &sql.join(" UNION ALL "), &params)?)
    };
    let id = interim.1;
    let sealed_to = (hour + RESOLVE_HOURS).min(cov.sealed_hour.unwrap_or(i32::MIN));
    match cov.ends_of(hour, id.start_ms) {
        // One row group of the start day's ends, instead of one of each hour after; a flow
        // asked about in the hour it started may have ended in the next, which the ends leave
        // out: that hour's final slices are read in the same statement (a second statement
        // cost 4-9 ms on a cold file, about 1 ms warm).
        Some(table) if hour < sealed_to => {
            let (mut sql, mut params) =
                if id.start_ms.map(crate::store::trail::hour_of) == Some(hour) {
                    sealed_parts(&cov.partitions(hour + 1, hour + 1), ip, port, FINAL_ONLY)
                } else {
                    (Vec::new(), Vec::new())
                };
            if let (Some(table), Some(start)) = (table, id.start_ms) {
                let (c, p) = slice_condition(hour + 1, sealed_to, ip, port);
                sql.push(format!(
                    "SELECT {SELECT} FROM {table} WHERE {c} AND start_ms = ?{FINAL_ONLY}"
                ));
                params.extend(p);
                params.push(Value::BigInt(start));
            }
            if !sql.is_empty()
                && let Some(flow) =
                    pick(&mut interim, run(conn, &sql.join(" UNION ALL "), &params)?)?
            {
                return Ok(flow);
            }
        }
        Some(_) => {}
        None => {
            for (first, last) in RESOLVE_STEPS {
                let (from, to) = (hour + first, (hour + last).min(sealed_to));
                if from > to {
                    break;
                }
                if let Some(flow) = in_hours(&mut interim, from, to)? {
                    return Ok(flow);
                }
            }
        }
    }
    // The unsorted hours, and the open flows whatever their hour.
    let (mut parts, mut params) = (Vec::new(), Vec::new());
    if cov.recent_reaches(hour + RESOLVE_HOURS) {
        let (c, p) = slice_condition(hour + 1, hour + RESOLVE_HOURS, ip, port);
        parts.push(format!(
            "SELECT {SELECT} FROM trail_recent WHERE {c}{FINAL_ONLY}"
        ));
        params.extend(p);
    }
    for table in ["open_flows", "open_journal"] {
        parts.push(format!(
            "SELECT {OPEN_SELECT} FROM {table} WHERE reply_dst = ? AND reply_dport = ?"
        ));
        params.extend(open_params(ip, port));
    }
    match pick(
        &mut interim,
        run(conn, &parts.join(" UNION ALL "), &params)?,
    )? {
        Some(flow) => Ok(flow),
        None => {
            fill_destinations(conn, cov, std::slice::from_mut(&mut interim))?;
            Ok(interim.0)
        }
    }
}

/// Reads the destinations of the sealed slices among `rows` from their hours' dictionaries,
/// in one statement.
fn fill_destinations(
    conn: &Connection,
    cov: &Coverage,
    rows: &mut [(FlowRow, Identity)],
) -> Result<(), QueryError> {
    let keys: Vec<(i32, u32)> = rows
        .iter()
        .filter_map(|(_, id)| Some((id.hour?, id.dst_id?)))
        .collect();
    let (Some(lo), Some(hi)) = (
        keys.iter().map(|k| k.0).min(),
        keys.iter().map(|k| k.0).max(),
    ) else {
        return Ok(());
    };
    let mut parts = Vec::new();
    let mut params = Vec::new();
    for p in cov.partitions(lo, hi) {
        let ids: Vec<u32> = keys
            .iter()
            .filter(|k| (p.first..=p.last).contains(&k.0))
            .map(|k| k.1)
            .collect();
        if ids.is_empty() {
            continue;
        }
        parts.push(format!(
            "SELECT hour, id, dst4, dst6, dst_port FROM {}
             WHERE hour BETWEEN ? AND ? AND id IN ({})",
            p.dst,
            vec!["?"; ids.len()].join(", ")
        ));
        params.extend([Value::Int(p.first), Value::Int(p.last)]);
        params.extend(ids.into_iter().map(Value::UInt));
    }
    let found: Vec<((i32, u32), (Addr, u16))> = if parts.is_empty() {
        Vec::new()
    } else {
        let mut stmt = conn
            .prepare_cached(&parts.join(" UNION ALL "))
            .map_err(QueryError::db("preparing the destination query"))?;
        stmt.query_map(duckdb::params_from_iter(params.iter()), |r| {
            Ok(((r.get(0)?, r.get(1)?), (read_addr(r, 2)?, r.get(4)?)))
        })
        .map_err(QueryError::db("reading destinations"))?
        .collect::<Result<_, _>>()
        .map_err(QueryError::db("reading destinations"))?
    };
    for (f, id) in rows.iter_mut() {
        let Some(key) = id.hour.zip(id.dst_id) else {
            continue;
        };
        let Some((_, dst)) = found.iter().find(|(k, _)| *k == key) else {
            return Err(QueryError::Corrupt(format!(
                "sealed hour {} has no destination {} in its dictionary",
                key.0, key.1
            )));
        };
        id.dst = *dst;
        id.dst_id = None;
        f.dst_ip = dst.0.to_string();
        if f.dst_port.is_some() {
            f.dst_port = Some(dst.1);
        }
    }
    Ok(())
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
    // One snapshot, as `who`: a seal between two statements would hide an hour's slices.
    super::in_snapshot(conn, |conn| {
        matching(
            conn,
            &c,
            lo,
            hi,
            "start_ms NULLS FIRST, src_port, pub_port",
            Some(q.limit),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_names_become_positions_in_select() {
        assert_eq!(
            order_by_position("start_ms NULLS FIRST, src_port, pub_port").unwrap(),
            "14 NULLS FIRST, 7, 10"
        );
        assert_eq!(
            order_by_position("hour DESC, dst_id").unwrap(),
            "1 DESC, 22"
        );
        assert!(matches!(
            order_by_position("start_ms, nonesuch"),
            Err(QueryError::Invalid(m)) if m.contains("nonesuch")
        ));
    }
}
