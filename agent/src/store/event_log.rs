//! The event log (`event_log`): log hits (appended in groups), agent events and capture gaps
//! (one statement a row), and the log cursors saved in the same transaction as the hits they
//! cover.

use duckdb::{Connection, params};
use foldhash::{HashMap, HashMapExt};

use super::bus::StoredEvent;
use super::cursors;
use super::schema::{StoreError, db_err};
use super::sessions::ts_value;
use crate::pipeline::flow::{FlowEvent, proto_name};
use crate::pipeline::messages::{LogBatch, LogEvent, Pos};

/// Inserts one row; the caller's transaction (or autocommit) commits it.
pub fn insert(conn: &Connection, e: LogEvent) -> Result<StoredEvent, StoreError> {
    let id: u64 = conn
        .prepare_cached(
            "INSERT INTO event_log (ts, source, severity, message, metadata)
             VALUES (?, ?, ?, ?, ?::JSON) RETURNING id",
        )
        .and_then(|mut st| {
            st.query_row(
                params![
                    ts_value(e.ts_ns),
                    e.source,
                    e.severity,
                    e.message,
                    e.metadata.to_string()
                ],
                |r| r.get(0),
            )
        })
        .map_err(db_err("writing an event-log row"))?;
    Ok(stored(id, e))
}

/// `e` as stored under `id`.
fn stored(id: u64, e: LogEvent) -> StoredEvent {
    StoredEvent {
        id,
        ts_ns: e.ts_ns,
        source: e.source,
        severity: e.severity,
        message: e.message,
        metadata: e.metadata,
    }
}

/// Stores the hits and cursors of several batches in one transaction: one commit however
/// many queued up behind the last. Only each container's last position is saved.
///
/// The hits go through an appender with ids drawn from the table's sequence beforehand: one
/// `INSERT .. RETURNING` a hit cost about 1 ms, which held a flooded writer near 1,000 hits
/// a second.
pub fn store_batches(
    conn: &Connection,
    batches: Vec<LogBatch>,
) -> Result<Vec<StoredEvent>, StoreError> {
    in_transaction(conn, "storing log hits", |conn| {
        let mut last: HashMap<String, Pos> = HashMap::new();
        let mut hits = Vec::new();
        for LogBatch {
            container_id,
            hits: batch,
            cursor,
        } in batches
        {
            hits.extend(batch);
            if let Some(pos) = cursor {
                last.insert(container_id, pos);
            }
        }
        let stored = append(conn, hits)?;
        for (id, pos) in &last {
            cursors::save(conn, id, pos)?;
        }
        Ok(stored)
    })
}

/// Appends `events` to `event_log` in the caller's transaction, ids in their order.
fn append(conn: &Connection, events: Vec<LogEvent>) -> Result<Vec<StoredEvent>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let what = "writing event-log rows";
    // nextval per row of one statement: the ids are sorted so that the bus, which readers
    // follow by id, publishes them in the order the hits came.
    let mut ids: Vec<u64> = conn
        .prepare_cached("SELECT nextval('event_log_ids')::UBIGINT FROM range(?)")
        .and_then(|mut st| {
            st.query_map([events.len() as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()
        })
        .map_err(db_err(what))?;
    ids.sort_unstable();
    let mut app = conn.appender("event_log").map_err(db_err(what))?;
    let mut rows = Vec::with_capacity(events.len());
    for (id, e) in ids.into_iter().zip(events) {
        app.append_row(params![
            id,
            ts_value(e.ts_ns),
            e.source,
            e.severity,
            e.message,
            e.metadata.to_string()
        ])
        .map_err(db_err(what))?;
        rows.push(stored(id, e));
    }
    app.flush().map_err(db_err(what))?;
    Ok(rows)
}

/// A capture gap of `source`: its row in `capture_gaps`, and the agent event that announces
/// it, in one transaction.
pub struct Gap<'a> {
    /// The capture session.
    pub session_id: u64,
    /// What lost events ("conntrack->writer", "netlink").
    pub source: &'a str,
    /// Start and end of the window, in ns.
    pub start_ns: u64,
    /// End (at least `start_ns`).
    pub end_ns: u64,
    /// Events lost, if known.
    pub lost: Option<u64>,
    /// Why.
    pub reason: &'a str,
}

/// Records `g`; returns the agent event stored with it.
pub fn record_gap(conn: &Connection, g: &Gap<'_>) -> Result<StoredEvent, StoreError> {
    let end_ns = g.end_ns.max(g.start_ns);
    in_transaction(conn, "recording a capture gap", |conn| {
        conn.execute(
            "INSERT INTO capture_gaps VALUES (?, ?, ?, ?, ?, ?)",
            params![
                g.session_id,
                g.source,
                ts_value(g.start_ns),
                ts_value(end_ns),
                g.lost,
                g.reason
            ],
        )
        .map_err(db_err("recording a capture gap"))?;
        insert(
            conn,
            LogEvent {
                ts_ns: g.start_ns,
                source: "agent",
                severity: "warning",
                message: format!(
                    "capture gap in {}: {} events lost ({})",
                    g.source,
                    g.lost
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    g.reason
                ),
                metadata: serde_json::json!({
                    "kind": "capture_gap",
                    "source": g.source,
                    "lost": g.lost,
                    "reason": g.reason,
                    "end_ns": end_ns,
                }),
            },
        )
    })
}

/// Runs `f` in one transaction on `conn` (an appender's rows are not touched: it only
/// flushes when told).
pub(super) fn in_transaction<T>(
    conn: &Connection,
    what: &'static str,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("BEGIN TRANSACTION")
        .map_err(db_err(what))?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("COMMIT").map_err(db_err(what))?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// The connection event the bus carries for a flow row (not stored in `event_log`: its id is
/// the row's sequence number): the flow's internal, public and destination endpoints.
pub fn connection_event(ev: &FlowEvent, seq: u64, ts_ns: u64) -> StoredEvent {
    let proto = proto_name(ev.proto);
    let (internal, public, dst) = (
        (ev.orig.src.to_ip(), ev.orig.sport),
        (ev.reply.dst.to_ip(), ev.reply.dport),
        (ev.orig.dst.to_ip(), ev.orig.dport),
    );
    let sock = |(ip, port): (std::net::IpAddr, u16)| std::net::SocketAddr::new(ip, port);
    StoredEvent {
        id: seq,
        ts_ns,
        source: "conntrack",
        severity: "info",
        message: format!(
            "{} {proto} flow {} -> {} as {}",
            ev.kind.name(),
            sock(internal),
            sock(dst),
            sock(public)
        ),
        metadata: serde_json::json!({
            "kind": ev.kind.name(),
            "proto": proto,
            "internal_ip": internal.0.to_string(),
            "internal_port": internal.1,
            "public_ip": public.0.to_string(),
            "public_port": public.1,
            "dst_ip": dst.0.to_string(),
            "dst_port": dst.1,
        }),
    }
}
