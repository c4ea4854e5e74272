//! The open flows' checkpoint (`open_flows`): the writer saves its open set now and then, and
//! a start loads it and replays only what was written since (flows opened, in
//! `open_journal`; flows ended, final slices in `trail_recent`), never the history.

use duckdb::{Connection, Row, params};
use tracing::info;

use super::columns::{self, OpenRow};
use super::database::Database;
use super::reconcile::{FlowKey, OpenFlow, OpenFlows};
use super::schema::{StoreError, db_err};
use crate::pipeline::flow::{Addr, Tuple};

/// The columns every query here selects, in this order (`open_flows`' own order).
const FLOW_COLUMNS: &str = "ct_id, zone, proto, orig_src, orig_dst, orig_sport, orig_dport, \
     reply_src, reply_dst, reply_sport, reply_dport, family, start_us, by_dump";

/// Rows a recovery statement reads at most: duckdb-rs holds a statement's whole result, and
/// 2 M open flows read at once cost about 170 MiB on top of the table they fill.
const PAGE: u64 = 100_000;

/// How the open set was recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint's sequence number, or None when there was none.
    pub checkpoint: Option<u64>,
    /// Flows loaded from the checkpoint.
    pub loaded: usize,
    /// Trail rows replayed over the checkpoint.
    pub replayed: usize,
}

fn flow_of(r: &Row<'_>) -> duckdb::Result<(FlowKey, OpenFlow)> {
    let key = FlowKey {
        ct_id: r.get(0)?,
        zone: r.get(1)?,
        proto: r.get(2)?,
        orig: Tuple {
            src: Addr(r.get(3)?),
            dst: Addr(r.get(4)?),
            sport: r.get(5)?,
            dport: r.get(6)?,
        },
    };
    let start_us: i64 = r.get(12)?;
    let by_dump: Option<bool> = r.get(13)?;
    let flow = OpenFlow::loaded(
        Tuple {
            src: Addr(r.get(7)?),
            dst: Addr(r.get(8)?),
            sport: r.get(9)?,
            dport: r.get(10)?,
        },
        start_us.max(0) as u64 * 1_000,
        by_dump.unwrap_or(false),
    );
    Ok((key, flow))
}

/// Fills `flows` with the trail's open flows: the checkpoint, then the flows opened and ended
/// since, in the order they were written.
pub fn recover(conn: &Connection, flows: &mut OpenFlows) -> Result<Recovery, StoreError> {
    recover_in_pages(conn, flows, PAGE)
}

/// `recover`, reading at most `page` rows a statement.
pub(super) fn recover_in_pages(
    conn: &Connection,
    flows: &mut OpenFlows,
    page: u64,
) -> Result<Recovery, StoreError> {
    let what = "reading the open-flow checkpoint";
    let checkpoint: Option<u64> = conn
        .query_row("SELECT max(next_seq) FROM open_flows_checkpoint", [], |r| {
            r.get(0)
        })
        .map_err(db_err(what))?;
    let next_seq = checkpoint.unwrap_or(0);
    let (first, last): (Option<u64>, Option<u64>) = conn
        .query_row("SELECT min(rowid), max(rowid) FROM open_flows", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(db_err(what))?;
    let mut st = conn
        .prepare(&format!(
            "SELECT {FLOW_COLUMNS}, covered FROM open_flows WHERE rowid >= ?1 AND rowid < ?2"
        ))
        .map_err(db_err(what))?;
    let mut loaded = 0;
    for (from, to) in pages(first, last, page) {
        for row in st
            .query_map(params![from, to], |r| {
                Ok((flow_of(r)?, r.get::<_, Option<i32>>(14)?))
            })
            .map_err(db_err(what))?
        {
            let ((k, mut v), covered) = row.map_err(db_err(what))?;
            // NULL (a checkpoint of an older writer): covered up to the hour before its start,
            // as a journal row is; the next sweep may write slices again, never miss one.
            if let Some(c) = covered {
                v.covered = v.covered.max(c);
            }
            flows.load(k, v);
            loaded += 1;
        }
    }
    // A journal row opens its flow, a final slice closes it. Both tables hold only what was
    // written since the last seal and checkpoint: small, whatever the history.
    let what = "replaying the trail since the checkpoint";
    let end: Option<u64> = conn
        .query_row(
            "SELECT greatest((SELECT max(seq) FROM open_journal),
                             (SELECT max(seq) FROM trail_recent WHERE flags & 1 = 1))::UBIGINT",
            [],
            |r| r.get(0),
        )
        .map_err(db_err(what))?;
    let mut st = conn
        .prepare(&format!(
            "SELECT {FLOW_COLUMNS}, seq, false AS closes FROM open_journal
             WHERE seq >= ?1 AND seq < ?2
             UNION ALL
             SELECT ct_id, zone, proto, nt_addr(src4, src6), nt_addr(dst4, dst6), src_port,
                    dst_port, 0::UHUGEINT, 0::UHUGEINT, 0::USMALLINT, 0::USMALLINT, 0::UTINYINT,
                    0::BIGINT, false, seq, true
             FROM trail_recent WHERE seq >= ?1 AND seq < ?2 AND flags & 1 = 1
             ORDER BY seq"
        ))
        .map_err(db_err(what))?;
    let mut replayed = 0;
    for (from, to) in pages(Some(next_seq), end, page) {
        for row in st
            .query_map(params![from, to], |r| {
                Ok((flow_of(r)?, r.get::<_, bool>(15)?))
            })
            .map_err(db_err(what))?
        {
            let ((k, v), closes) = row.map_err(db_err(what))?;
            if closes {
                flows.unload(&k);
            } else {
                flows.load(k, v);
            }
            replayed += 1;
        }
    }
    info!(
        open = flows.len(),
        checkpoint_flows = loaded,
        replayed,
        "open flows recovered from the checkpoint"
    );
    Ok(Recovery {
        checkpoint,
        loaded,
        replayed,
    })
}

/// Half-open ranges `[from, to)` of at most `page` values covering `first..=last` (none when
/// either is unknown or `first` is past `last`).
fn pages(first: Option<u64>, last: Option<u64>, page: u64) -> impl Iterator<Item = (u64, u64)> {
    let (first, end) = match (first, last) {
        (Some(f), Some(l)) if f <= l => (f, l + 1),
        _ => (0, 0),
    };
    (first..end)
        .step_by(page as usize)
        .map(move |from| (from, from.saturating_add(page).min(end)))
}

/// Saves `flows` as the open set of every row before `next_seq` (call it right after a
/// commit, when no row is pending). Appended to the staging table first, then swapped in
/// with the sequence number in one transaction: a crash leaves the previous checkpoint.
pub fn checkpoint(
    db: &Database,
    conn: &Connection,
    flows: &OpenFlows,
    next_seq: u64,
) -> Result<(), StoreError> {
    conn.execute_batch("DELETE FROM open_flows_staging")
        .map_err(db_err("clearing the open-flow staging table"))?;
    let mut app = db.appender("open_flows_staging")?;
    for (k, v) in flows.iter_by_public() {
        app.begin_row()?;
        columns::append_open(&mut app, &open_row(&k, &v));
        app.set(13, v.by_dump);
        app.set(14, v.covered);
        app.end_row();
    }
    app.flush()?;
    drop(app);
    conn.execute_batch(&format!(
        "BEGIN TRANSACTION;
         DELETE FROM open_flows;
         INSERT INTO open_flows SELECT * FROM open_flows_staging;
         DELETE FROM open_journal WHERE seq < {next_seq};
         DELETE FROM open_flows_checkpoint;
         INSERT INTO open_flows_checkpoint VALUES ({next_seq}, now()::TIMESTAMP);
         COMMIT;"
    ))
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        db_err("swapping in the open-flow checkpoint")(e)
    })?;
    Ok(())
}

/// An open flow as its checkpoint and journal rows hold it.
pub fn open_row(k: &FlowKey, v: &OpenFlow) -> OpenRow {
    OpenRow {
        ct_id: k.ct_id,
        zone: k.zone,
        proto: k.proto,
        orig: k.orig,
        reply: v.reply,
        family: if k.orig.src.is_v4() { 4 } else { 6 },
        start_us: (v.start_ns.unwrap_or(0) / 1_000) as i64,
        by_dump: v.by_dump,
    }
}
