//! Conntrack events (the starts and ends of flows) in time order, rebuilt from the trail
//! for a window, paged by sequence number.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use duckdb::Connection;
use duckdb::types::Value;
use serde::{Deserialize, Serialize};

use super::QueryError;
use super::flows::{Conditions, bounds, one_row_per_flow};
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
    /// Position among the events the query selects, in time order; the paging cursor.
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

/// Reads one page. The events are rebuilt from the flows of the hours `since` and `until`
/// bound, the filters applied to the slices before anything is sorted: the starts and ends of
/// the flows found, numbered in time order (`seq`, from 0, among the events this query
/// selects, so a cursor pages the query that gave it).
pub fn events(conn: &Connection, q: &EventsQuery) -> Result<EventsPage, QueryError> {
    use crate::store::trail::hour_of;
    let mut cond = Conditions::default();
    if let Some(ip) = q.ip {
        cond.any_ip(ip);
    }
    if let Some(p) = q.port {
        cond.any_port(p);
    }
    let lo = q.since.map(|t| t.timestamp_micros().div_euclid(1_000));
    let hi = q.until.map(|t| t.timestamp_micros().div_euclid(1_000));
    // An event at t is in the slice of its flow in t's hour (every flow alive in an hour has
    // one there): the start in its first slice, the end in its final one.
    cond.hours(lo.map(hour_of), hi.map(hour_of));
    // Only the slices that hold an event of the window, before one row per flow is picked:
    // a second of a busy hour dedups the thousand flows that started or ended in it, not the
    // hour's 1.7 M. A flow keeps its start in every slice, so a start in the window is kept
    // whichever slice is picked.
    let bounded = |col| bounds(col, lo.map(Value::BigInt), hi.map(Value::BigInt));
    let (start_in, mut tail) = bounded("start_ms");
    let (end_in, end_params) = bounded("end_ms");
    tail.extend(end_params);
    let in_window = if tail.is_empty() {
        String::new()
    } else {
        format!(" AND ((start_ms IS NOT NULL{start_in}) OR (flags & 1 = 1{end_in}))")
    };
    let (mut when, t_params) = bounded("t");
    tail.extend(t_params);
    if let Some(k) = q.kind {
        when.push_str(" AND kind = ?");
        tail.push(Value::UTinyInt(k));
    }
    tail.push(Value::UBigInt(q.after_seq.map_or(0, |s| s + 1)));
    tail.push(Value::UBigInt(q.limit as u64 + 1));
    super::in_snapshot(conn, |conn| {
        let (flows, _, parts) = one_row_per_flow(conn, &cond, &in_window)?;
        // As the view `conntrack_events`, which numbers the whole trail's events. Columns
        // named and the order by position: see `flows::SELECT`.
        let sql = format!(
            "WITH f AS ({flows}),
             e AS (SELECT start_ms AS t, CASE WHEN flags & 2 = 2 THEN 3 ELSE 1 END AS kind,
                          * EXCLUDE (seq)
                   FROM f WHERE start_ms IS NOT NULL AND flags & 16 = 0
                   UNION ALL
                   SELECT end_ms AS t, 2 AS kind, * EXCLUDE (seq) FROM f WHERE flags & 1 = 1)
             SELECT * FROM (
                 SELECT (row_number() OVER (ORDER BY t, kind, proto, zone, nt_addr(src4, src6),
                             src_port, nt_addr(dst4, dst6), dst_port, nt_addr(pub4, pub6),
                             pub_port) - 1)::UBIGINT AS seq,
                        t * 1000 AS ts_us, 0::UTINYINT AS ts_source, kind::UTINYINT AS kind,
                        proto, nt_addr(src4, src6) AS orig_src, src_port AS orig_sport,
                        nt_addr(pub4, pub6) AS reply_dst, pub_port AS reply_dport,
                        nt_addr(dst4, dst6) AS orig_dst, dst_port AS orig_dport, ct_id,
                        (kind = 2 AND flags & 4 = 4) AS inexact,
                        CASE WHEN kind = 2 THEN bytes_out END AS orig_bytes,
                        CASE WHEN kind = 2 THEN bytes_in END AS reply_bytes
                 FROM e WHERE true {when})
             WHERE seq >= ? ORDER BY 1 LIMIT ?"
        );
        read_page(conn, &sql, &cond.params(parts, &tail), q.limit)
    })
}

/// Runs the page's statement and reads `limit` events, and whether there are more.
fn read_page(
    conn: &Connection,
    sql: &str,
    params: &[Value],
    limit: usize,
) -> Result<EventsPage, QueryError> {
    let mut stmt = conn
        .prepare(sql)
        .map_err(QueryError::db("preparing events"))?;
    let rows = stmt
        .query_map(duckdb::params_from_iter(params.iter()), |r| {
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
    let next_cursor = if events.len() > limit {
        events.truncate(limit);
        events.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(EventsPage {
        events,
        next_cursor,
    })
}
