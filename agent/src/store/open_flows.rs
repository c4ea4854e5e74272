//! The open flows' checkpoint (`open_flows`, schema 7): the writer saves its open set now and
//! then, and a start loads it and replays only the trail's rows since, instead of scanning
//! the whole history for NEW events without a DESTROY.

use duckdb::{Connection, Row, params};
use tracing::info;

use super::database::Database;
use super::reconcile::{FlowKey, OpenFlow, OpenFlows};
use super::schema::{StoreError, db_err};
use crate::pipeline::flow::{Addr, Tuple};

/// The columns every query here selects, in this order (`open_flows`' own order).
const FLOW_COLUMNS: &str = "ct_id, zone, proto, orig_src, orig_dst, orig_sport, orig_dport, \
     reply_src, reply_dst, reply_sport, reply_dport, family, mark, status";

/// How the open set was recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint's sequence number, or None when there was none (a full scan).
    pub checkpoint: Option<u64>,
    /// Flows loaded from the checkpoint (or found by the scan).
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
    let start_us: i64 = r.get(14)?;
    let flow = OpenFlow::loaded(
        Tuple {
            src: Addr(r.get(7)?),
            dst: Addr(r.get(8)?),
            sport: r.get(9)?,
            dport: r.get(10)?,
        },
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        start_us.max(0) as u64 * 1_000,
    );
    Ok((key, flow))
}

/// Fills `flows` with the trail's open flows: the checkpoint and the rows since, or (no
/// checkpoint yet) a scan of the whole trail.
pub fn recover(conn: &Connection, flows: &mut OpenFlows) -> Result<Recovery, StoreError> {
    let checkpoint: Option<u64> = conn
        .query_row("SELECT max(next_seq) FROM open_flows_checkpoint", [], |r| {
            r.get(0)
        })
        .map_err(db_err("reading the open-flow checkpoint"))?;
    let Some(next_seq) = checkpoint else {
        let loaded = scan(conn, flows)?;
        info!(
            open = loaded,
            "open flows recovered by a scan of the trail (no checkpoint yet)"
        );
        return Ok(Recovery {
            checkpoint: None,
            loaded,
            replayed: 0,
        });
    };
    let mut st = conn
        .prepare(&format!("SELECT {FLOW_COLUMNS}, start_us FROM open_flows"))
        .map_err(db_err("reading the open-flow checkpoint"))?;
    let mut loaded = 0;
    for row in st
        .query_map([], flow_of)
        .map_err(db_err("reading the open-flow checkpoint"))?
    {
        let (k, v) = row.map_err(db_err("reading the open-flow checkpoint"))?;
        flows.load(k, v);
        loaded += 1;
    }
    // The rows written after the checkpoint, in order: a NEW or dump row opens its flow, a
    // DESTROY (exact or reconciled) closes it. Sequence numbers only grow, so DuckDB's zone
    // maps skip the history.
    let mut st = conn
        .prepare(&format!(
            "SELECT {FLOW_COLUMNS}, epoch_us(coalesce(start_ts, ts)), kind FROM conntrack_events
             WHERE seq >= ? ORDER BY seq"
        ))
        .map_err(db_err("replaying the trail since the checkpoint"))?;
    let mut replayed = 0;
    for row in st
        .query_map(params![next_seq], |r| {
            Ok((flow_of(r)?, r.get::<_, u8>(15)?))
        })
        .map_err(db_err("replaying the trail since the checkpoint"))?
    {
        let ((k, v), kind) = row.map_err(db_err("replaying the trail since the checkpoint"))?;
        if kind == 2 {
            flows.unload(&k);
        } else {
            flows.load(k, v);
        }
        replayed += 1;
    }
    info!(
        open = flows.len(),
        checkpoint_flows = loaded,
        replayed,
        "open flows recovered from the checkpoint"
    );
    Ok(Recovery {
        checkpoint: Some(next_seq),
        loaded,
        replayed,
    })
}

/// Every NEW or dump row without a later DESTROY: the whole history, once per trail.
fn scan(conn: &Connection, flows: &mut OpenFlows) -> Result<usize, StoreError> {
    let mut st = conn
        .prepare(
            "SELECT s.ct_id, s.zone, s.proto, s.orig_src, s.orig_dst, s.orig_sport, s.orig_dport,
                    s.reply_src, s.reply_dst, s.reply_sport, s.reply_dport, s.family, s.mark,
                    s.status, epoch_us(coalesce(s.start_ts, s.ts))
             FROM conntrack_events s
             WHERE s.kind IN (1, 3) AND NOT EXISTS (
                SELECT 1 FROM conntrack_events d
                WHERE d.kind = 2 AND d.ct_id = s.ct_id AND d.zone = s.zone AND d.proto = s.proto
                  AND d.orig_src = s.orig_src AND d.orig_sport = s.orig_sport
                  AND d.orig_dst = s.orig_dst AND d.orig_dport = s.orig_dport
                  AND d.seq > s.seq)",
        )
        .map_err(db_err("preparing the open-flow query"))?;
    let mut n = 0;
    for row in st
        .query_map([], flow_of)
        .map_err(db_err("loading open flows"))?
    {
        let (k, v) = row.map_err(db_err("loading open flows"))?;
        flows.load(k, v);
        n += 1;
    }
    Ok(n)
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
    for (k, v) in flows.iter() {
        app.begin_row()?;
        app.set(0, k.ct_id);
        app.set(1, k.zone);
        app.set(2, k.proto);
        app.set(3, k.orig.src.0);
        app.set(4, k.orig.dst.0);
        app.set(5, k.orig.sport);
        app.set(6, k.orig.dport);
        app.set(7, v.reply.src.0);
        app.set(8, v.reply.dst.0);
        app.set(9, v.reply.sport);
        app.set(10, v.reply.dport);
        app.set(11, v.family);
        app.set(12, v.mark);
        app.set(13, v.status);
        app.set(14, (v.start_ns.unwrap_or(0) / 1_000) as i64);
        app.end_row();
    }
    app.flush()?;
    drop(app);
    conn.execute_batch(&format!(
        "BEGIN TRANSACTION;
         DELETE FROM open_flows;
         INSERT INTO open_flows SELECT * FROM open_flows_staging;
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
