//! How a flow maps onto the columns the writer appends: a slice of `trail_recent` (one hour of
//! a flow) and a row of `open_journal` (a flow opened since the checkpoint).

use duckdb::ffi;

use super::chunk_appender::ChunkAppender;
use super::schema::StoreError;
use crate::pipeline::flow::{Addr, Counters, Tuple};

use ffi::{
    DUCKDB_TYPE_DUCKDB_TYPE_BIGINT as I64, DUCKDB_TYPE_DUCKDB_TYPE_BOOLEAN as BOOL,
    DUCKDB_TYPE_DUCKDB_TYPE_INTEGER as I32, DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT as U64,
    DUCKDB_TYPE_DUCKDB_TYPE_UHUGEINT as U128, DUCKDB_TYPE_DUCKDB_TYPE_UINTEGER as U32,
    DUCKDB_TYPE_DUCKDB_TYPE_USMALLINT as U16, DUCKDB_TYPE_DUCKDB_TYPE_UTINYINT as U8,
};

/// The column types of `trail_recent` (and `flow_trail`), in table order: checked when the
/// writer opens, so a schema change cannot shift values into the wrong column.
pub const SLICE_COLUMNS: [ffi::DUCKDB_TYPE; 25] = [
    I32, U8, U8, U16, U32, U128, U16, U32, U128, U16, U32, U128, U16, U32, U128, U16, I64, I64,
    I64, U64, U64, U64, U64, U32, U64,
];

/// The column types of `open_journal`, in table order.
pub const JOURNAL_COLUMNS: [ffi::DUCKDB_TYPE; 15] = [
    U32, U16, U8, U128, U128, U16, U16, U128, U128, U16, U16, U8, I64, U64, BOOL,
];

/// Slice flag: the flow ended in this hour (else it was alive past the hour's end).
pub const FINAL: u8 = 1;
/// Slice flag: the flow was found by a table dump, not a NEW event.
pub const BY_DUMP: u8 = 2;
/// Slice flag: the end is only bounded (the flow was found gone by a dump).
pub const INEXACT: u8 = 4;
/// Slice flag: the trail never saw the flow begin (its NEW was lost); the start is the
/// kernel's timestamp carried by the end.
pub const UNSEEN: u8 = 16;

/// One hour of one flow.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    /// Partition.
    pub hour: i32,
    /// FINAL, BY_DUMP, INEXACT, UNSEEN.
    pub flags: u8,
    /// IP protocol.
    pub proto: u8,
    /// conntrack zone.
    pub zone: u16,
    /// Public address and port (reply destination).
    pub public: (Addr, u16),
    /// Internal client (original source).
    pub src: (Addr, u16),
    /// Destination as the client sees it.
    pub dst: (Addr, u16),
    /// Reply source where it differs from the destination (destination NAT).
    pub dnat: Option<(Addr, u16)>,
    /// Start in ms, rounded down.
    pub start_ms: Option<i64>,
    /// End in ms, rounded up (final slices).
    pub end_ms: Option<i64>,
    /// For inexact ends: alive until at least here.
    pub end_lo_ms: Option<i64>,
    /// Client → destination counters (final slices).
    pub out: Option<Counters>,
    /// Destination → client counters (final slices).
    pub back: Option<Counters>,
    /// conntrack id.
    pub ct_id: u32,
    /// Writer's sequence number.
    pub seq: u64,
}

impl Slice {
    /// An interim slice of hour `hour` (no end, no counters, sequence number 0): the fields
    /// every slice of one flow shares; a final slice sets the rest.
    #[allow(clippy::too_many_arguments)]
    pub fn interim(
        hour: i32,
        proto: u8,
        zone: u16,
        ct_id: u32,
        orig: &Tuple,
        reply: &Tuple,
        start_ms: Option<i64>,
        by_dump: bool,
    ) -> Slice {
        Slice {
            hour,
            flags: if by_dump { BY_DUMP } else { 0 },
            proto,
            zone,
            public: (reply.dst, reply.dport),
            src: (orig.src, orig.sport),
            dst: (orig.dst, orig.dport),
            dnat: dnat(proto, orig, reply),
            start_ms,
            end_ms: None,
            end_lo_ms: None,
            out: None,
            back: None,
            ct_id,
            seq: 0,
        }
    }
}

/// The reply source of a flow whose destination was translated (destination NAT), else None.
/// ICMP carries its id in the source port of both directions: only the address counts.
fn dnat(proto: u8, orig: &Tuple, reply: &Tuple) -> Option<(Addr, u16)> {
    let icmp = matches!(proto, 1 | 58);
    (reply.src != orig.dst || (!icmp && reply.sport != orig.dport))
        .then_some((reply.src, reply.sport))
}

fn set_addr(app: &mut ChunkAppender, col: usize, a: Option<Addr>) {
    match a {
        Some(a) if a.is_v4() => {
            app.set(col, a.0 as u32);
            app.set_null(col + 1);
        }
        Some(a) => {
            app.set_null(col);
            app.set(col + 1, a.0);
        }
        None => {
            app.set_null(col);
            app.set_null(col + 1);
        }
    }
}

/// Appends one slice.
pub fn append_slice(app: &mut ChunkAppender, s: &Slice) -> Result<(), StoreError> {
    app.begin_row()?;
    app.set(0, s.hour);
    app.set(1, s.flags);
    app.set(2, s.proto);
    app.set(3, s.zone);
    set_addr(app, 4, Some(s.public.0));
    app.set(6, s.public.1);
    set_addr(app, 7, Some(s.src.0));
    app.set(9, s.src.1);
    set_addr(app, 10, Some(s.dst.0));
    app.set(12, s.dst.1);
    set_addr(app, 13, s.dnat.map(|d| d.0));
    app.set_opt(15, s.dnat.map(|d| d.1));
    app.set_opt(16, s.start_ms);
    app.set_opt(17, s.end_ms);
    app.set_opt(18, s.end_lo_ms);
    app.set_opt(19, s.out.map(|c| c.packets));
    app.set_opt(20, s.out.map(|c| c.bytes));
    app.set_opt(21, s.back.map(|c| c.packets));
    app.set_opt(22, s.back.map(|c| c.bytes));
    app.set(23, s.ct_id);
    app.set(24, s.seq);
    app.end_row();
    Ok(())
}

/// One open flow as `open_flows` and `open_journal` hold it.
#[derive(Debug, Clone, Copy)]
pub struct OpenRow {
    /// conntrack id.
    pub ct_id: u32,
    /// conntrack zone.
    pub zone: u16,
    /// IP protocol.
    pub proto: u8,
    /// Original tuple (src, dst, sport, dport).
    pub orig: crate::pipeline::flow::Tuple,
    /// Reply tuple.
    pub reply: crate::pipeline::flow::Tuple,
    /// 4 or 6.
    pub family: u8,
    /// Start in µs.
    pub start_us: i64,
    /// Found by a dump.
    pub by_dump: bool,
}

/// Appends the 13 columns `open_flows` and `open_journal` share.
pub fn append_open(app: &mut ChunkAppender, r: &OpenRow) {
    app.set(0, r.ct_id);
    app.set(1, r.zone);
    app.set(2, r.proto);
    app.set(3, r.orig.src.0);
    app.set(4, r.orig.dst.0);
    app.set(5, r.orig.sport);
    app.set(6, r.orig.dport);
    app.set(7, r.reply.src.0);
    app.set(8, r.reply.dst.0);
    app.set(9, r.reply.sport);
    app.set(10, r.reply.dport);
    app.set(11, r.family);
    app.set(12, r.start_us);
}

/// Appends one journal row: the open flow, its sequence number.
pub fn append_journal(app: &mut ChunkAppender, r: &OpenRow, seq: u64) -> Result<(), StoreError> {
    app.begin_row()?;
    append_open(app, r);
    app.set(13, seq);
    app.set(14, r.by_dump);
    app.end_row();
    Ok(())
}
