//! Raw conntrack events in order of receipt, paged by sequence number.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use duckdb::{Connection, ToSql};
use serde::{Deserialize, Serialize};

use super::QueryError;
use crate::pipeline::clock::rfc3339_us;
use crate::pipeline::flow::{Addr, proto_name};

/// Filters of an events page.
#[derive(Debug, Clone, Default)]
pub struct EventsQuery {
    /// At or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// At or before this instant.
    pub until: Option<DateTime<Utc>>,
    /// Any address of the flow.
    pub ip: Option<IpAddr>,
    /// Any port of the flow.
    pub port: Option<u16>,
    /// 1 new, 2 destroy, 3 dump.
    pub kind: Option<u8>,
    /// Page size.
    pub limit: usize,
    /// Only events after this sequence number (the cursor).
    pub after_seq: Option<u64>,
}

/// One stored event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRow {
    /// Sequence number (order of receipt); the paging cursor.
    pub seq: u64,
    /// Event time, RFC 3339 UTC.
    pub ts: String,
    /// "kernel" or "receive": where the time came from.
    pub ts_source: String,
    /// new, destroy or dump.
    pub kind: String,
    /// tcp, udp, icmp, ...
    pub proto: String,
    /// Internal client.
    pub internal_ip: String,
    /// Client port (ICMP id).
    pub internal_port: u16,
    /// Public address after NAT.
    pub public_ip: String,
    /// Public port after NAT.
    pub public_port: u16,
    /// Destination.
    pub dst_ip: String,
    /// Destination port.
    pub dst_port: u16,
    /// Conntrack id.
    pub conntrack_id: Option<u32>,
    /// Closed by reconciliation, end only bounded.
    pub inexact: bool,
    /// Bytes client → destination (DESTROY only).
    pub bytes_out: Option<u64>,
    /// Bytes destination → client (DESTROY only).
    pub bytes_in: Option<u64>,
}

/// A page of events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventsPage {
    /// Events, oldest first.
    pub events: Vec<EventRow>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<u64>,
}

/// Reads one page.
pub fn events(conn: &Connection, q: &EventsQuery) -> Result<EventsPage, QueryError> {
    let mut sql = String::from(
        "SELECT seq, epoch_us(ts), ts_source, kind, proto, orig_src, orig_sport, reply_dst,
                reply_dport, orig_dst, orig_dport, ct_id, inexact, orig_bytes, reply_bytes
         FROM conntrack_events WHERE true",
    );
    let mut params: Vec<Box<dyn ToSql>> = Vec::new();
    if let Some(s) = q.after_seq {
        sql.push_str(" AND seq > ?");
        params.push(Box::new(s));
    }
    if let Some(t) = q.since {
        sql.push_str(" AND epoch_us(ts) >= ?");
        params.push(Box::new(t.timestamp_micros()));
    }
    if let Some(t) = q.until {
        sql.push_str(" AND epoch_us(ts) <= ?");
        params.push(Box::new(t.timestamp_micros()));
    }
    if let Some(ip) = q.ip {
        let a = Addr::from(ip).0;
        sql.push_str(" AND (orig_src = ? OR reply_dst = ? OR orig_dst = ?)");
        params.extend([Box::new(a) as Box<dyn ToSql>, Box::new(a), Box::new(a)]);
    }
    if let Some(p) = q.port {
        sql.push_str(" AND (orig_sport = ? OR reply_dport = ? OR orig_dport = ?)");
        params.extend([Box::new(p) as Box<dyn ToSql>, Box::new(p), Box::new(p)]);
    }
    if let Some(k) = q.kind {
        sql.push_str(" AND kind = ?");
        params.push(Box::new(k));
    }
    sql.push_str(" ORDER BY seq LIMIT ?");
    params.push(Box::new(q.limit as u64 + 1));
    let refs: Vec<&dyn ToSql> = params.iter().map(|b| b.as_ref()).collect();
    let mut stmt = conn
        .prepare(&sql)
        .map_err(QueryError::db("preparing events"))?;
    let rows = stmt
        .query_map(refs.as_slice(), |r| {
            let kind: u8 = r.get(3)?;
            Ok(EventRow {
                seq: r.get(0)?,
                ts: rfc3339_us(r.get(1)?),
                ts_source: if r.get::<_, u8>(2)? == 0 {
                    "kernel"
                } else {
                    "receive"
                }
                .to_string(),
                kind: match kind {
                    1 => "new",
                    2 => "destroy",
                    _ => "dump",
                }
                .to_string(),
                proto: proto_name(r.get(4)?),
                internal_ip: Addr(r.get(5)?).to_string(),
                internal_port: r.get(6)?,
                public_ip: Addr(r.get(7)?).to_string(),
                public_port: r.get(8)?,
                dst_ip: Addr(r.get(9)?).to_string(),
                dst_port: r.get(10)?,
                conntrack_id: r.get(11)?,
                inexact: r.get(12)?,
                bytes_out: r.get(13)?,
                bytes_in: r.get(14)?,
            })
        })
        .map_err(QueryError::db("running events"))?;
    let mut events = rows
        .collect::<Result<Vec<_>, _>>()
        .map_err(QueryError::db("reading events"))?;
    let next_cursor = if events.len() > q.limit {
        events.truncate(q.limit);
        events.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(EventsPage {
        events,
        next_cursor,
    })
}
