//! How a flow event maps onto the columns of `conntrack_events`, as the appender writes them.

use duckdb::ffi;

use super::chunk_appender::{ChunkAppender, Micros};
use super::schema::StoreError;
use crate::pipeline::flow::{FlowEvent, TimeSource};

/// The column types of `conntrack_events`, in table order: checked against the table when
/// the writer opens, so a schema change cannot shift values into the wrong column.
pub const CONNTRACK_COLUMNS: [ffi::DUCKDB_TYPE; 29] = {
    use ffi::{
        DUCKDB_TYPE_DUCKDB_TYPE_BOOLEAN as BOOL, DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP as TS,
        DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT as U64, DUCKDB_TYPE_DUCKDB_TYPE_UHUGEINT as U128,
        DUCKDB_TYPE_DUCKDB_TYPE_UINTEGER as U32, DUCKDB_TYPE_DUCKDB_TYPE_USMALLINT as U16,
        DUCKDB_TYPE_DUCKDB_TYPE_UTINYINT as U8,
    };
    [
        U64, TS, U8, U8, U8, U8, U16, U32, U32, U32, U128, U128, U16, U16, U128, U128, U16, U16,
        TS, TS, TS, BOOL, U64, U64, U64, U64, U8, U8, U8,
    ]
};

/// Nanoseconds as the microseconds DuckDB timestamps hold.
pub fn micros(ns: u64) -> Micros {
    Micros((ns / 1_000) as i64)
}

/// One row of `conntrack_events`: the event, its sequence number and time, and for a flow
/// closed by reconciliation the lower bound of its unknown end.
pub struct FlowRow<'a> {
    /// Sequence number (the row's order of receipt).
    pub seq: u64,
    /// The event.
    pub ev: &'a FlowEvent,
    /// Its time, and where that time came from.
    pub ts_ns: u64,
    /// Kernel timestamp or receipt.
    pub source: TimeSource,
    /// Lower bound of an inexact end.
    pub end_lo_ns: Option<u64>,
    /// Whether the end is inexact (the flow was found gone by a dump).
    pub inexact: bool,
}

/// Appends `row` through `app`.
pub fn append(app: &mut ChunkAppender, row: FlowRow<'_>) -> Result<(), StoreError> {
    let ev = row.ev;
    app.begin_row()?;
    app.set(0, row.seq);
    app.set(1, micros(row.ts_ns));
    app.set(2, row.source as u8);
    app.set(3, ev.kind as u8);
    app.set(4, ev.family);
    app.set(5, ev.proto);
    app.set(6, ev.zone);
    app.set(7, ev.ct_id);
    app.set(8, ev.mark);
    app.set(9, ev.status);
    app.set(10, ev.orig.src.0);
    app.set(11, ev.orig.dst.0);
    app.set(12, ev.orig.sport);
    app.set(13, ev.orig.dport);
    app.set(14, ev.reply.src.0);
    app.set(15, ev.reply.dst.0);
    app.set(16, ev.reply.sport);
    app.set(17, ev.reply.dport);
    app.set_opt(18, ev.start_ns.map(micros));
    app.set_opt(19, ev.stop_ns.map(micros));
    app.set_opt(20, row.end_lo_ns.map(micros));
    app.set(21, row.inexact);
    app.set_opt(22, ev.counters_orig.map(|c| c.packets));
    app.set_opt(23, ev.counters_orig.map(|c| c.bytes));
    app.set_opt(24, ev.counters_reply.map(|c| c.packets));
    app.set_opt(25, ev.counters_reply.map(|c| c.bytes));
    app.set_opt(26, ev.tcp_state);
    app.set_opt(27, ev.icmp.map(|i| i.0));
    app.set_opt(28, ev.icmp.map(|i| i.1));
    app.end_row();
    Ok(())
}
