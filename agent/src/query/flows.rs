//! Listing flows with filters on addresses, ports, protocol and a time window.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use duckdb::{Connection, Row, ToSql};
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
    /// The kernel's conntrack id.
    pub conntrack_id: u32,
    /// Conntrack zone.
    pub zone: u16,
    /// Found by a table dump (agent start or resync) rather than a NEW event.
    pub found_by_dump: bool,
    /// Start in µs since the epoch (for ordering).
    #[serde(skip)]
    pub start_us: Option<i64>,
    /// End in µs since the epoch (for ordering).
    #[serde(skip)]
    pub end_us: Option<i64>,
}

impl FlowRow {
    /// Reads the 18 columns every flow query selects, in this order: start_us, end_us,
    /// end_lo_us, inexact, by_dump, proto, orig_src, orig_sport, reply_dst, reply_dport,
    /// orig_dst, orig_dport, ct_id, zone, orig_bytes, orig_packets, reply_bytes, reply_packets.
    pub fn from_row(r: &Row<'_>) -> duckdb::Result<Self> {
        let start_us: Option<i64> = r.get(0)?;
        let end_us: Option<i64> = r.get(1)?;
        let proto: u8 = r.get(5)?;
        Ok(FlowRow {
            start_us,
            end_us,
            start: start_us.map(rfc3339_us),
            end: end_us.map(rfc3339_us),
            end_not_before: r.get::<_, Option<i64>>(2)?.map(rfc3339_us),
            end_inexact: r.get(3)?,
            found_by_dump: r.get(4)?,
            proto: proto_name(proto),
            internal_ip: Addr(r.get(6)?).to_string(),
            internal_port: r.get(7)?,
            public_ip: Addr(r.get(8)?).to_string(),
            public_port: r.get(9)?,
            dst_ip: Addr(r.get(10)?).to_string(),
            dst_port: if matches!(proto, 1 | 58) {
                None
            } else {
                Some(r.get(11)?)
            },
            conntrack_id: r.get(12)?,
            zone: r.get(13)?,
            bytes_out: r.get(14)?,
            packets_out: r.get(15)?,
            bytes_in: r.get(16)?,
            packets_in: r.get(17)?,
        })
    }
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
    let mut sql = String::from(
        "SELECT epoch_us(start), epoch_us(\"end\"), epoch_us(end_lo), end_inexact, found_by_dump,
                proto_num, orig_src, internal_port, reply_dst, public_port, orig_dst, dst_port,
                ct_id, zone, bytes_out, packets_out, bytes_in, packets_in
         FROM flows WHERE true",
    );
    let mut params: Vec<Box<dyn ToSql>> = Vec::new();
    let mut add = |sql: &mut String, cond: &str, vals: Vec<Box<dyn ToSql>>| {
        sql.push_str(cond);
        params.extend(vals);
    };
    if let Some(ip) = q.internal_ip {
        add(
            &mut sql,
            " AND orig_src = ?",
            vec![Box::new(Addr::from(ip).0)],
        );
    }
    if let Some(ip) = q.public_ip {
        add(
            &mut sql,
            " AND reply_dst = ?",
            vec![Box::new(Addr::from(ip).0)],
        );
    }
    if let Some(ip) = q.dst_ip {
        add(
            &mut sql,
            " AND orig_dst = ?",
            vec![Box::new(Addr::from(ip).0)],
        );
    }
    if let Some(p) = q.public_port {
        add(&mut sql, " AND public_port = ?", vec![Box::new(p)]);
    }
    if let Some(p) = q.dst_port {
        add(&mut sql, " AND dst_port = ?", vec![Box::new(p)]);
    }
    if let Some(p) = q.port {
        add(
            &mut sql,
            " AND (internal_port = ? OR public_port = ? OR dst_port = ?)",
            vec![Box::new(p), Box::new(p), Box::new(p)],
        );
    }
    if let Some(since) = q.since {
        add(
            &mut sql,
            " AND (\"end\" IS NULL OR epoch_us(\"end\") >= ?)",
            vec![Box::new(since.timestamp_micros())],
        );
    }
    if let Some(until) = q.until {
        add(
            &mut sql,
            " AND (start IS NULL OR epoch_us(start) <= ?)",
            vec![Box::new(until.timestamp_micros())],
        );
    }
    if let Some(p) = q.proto {
        sql.push_str(&format!(" AND proto_num IN ({})", p.numbers_sql()));
    }
    sql.push_str(" ORDER BY start NULLS FIRST, start_seq LIMIT ?");
    add(&mut sql, "", vec![Box::new(q.limit as u64)]);
    let refs: Vec<&dyn ToSql> = params.iter().map(|b| b.as_ref()).collect();
    let mut stmt = conn
        .prepare(&sql)
        .map_err(QueryError::db("preparing flows"))?;
    let rows = stmt
        .query_map(refs.as_slice(), FlowRow::from_row)
        .map_err(QueryError::db("running flows"))?;
    rows.map(|r| r.map_err(QueryError::db("reading flow rows")))
        .collect()
}
