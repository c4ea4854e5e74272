//! The flow trail's hourly partitions: which hour a slice belongs to, sealing an hour (sorted
//! by public address and port, so a lookup reads one row group of it), retention, and the
//! one-time move of a version-7 event trail into slices.

use duckdb::{Connection, params};
use tracing::info;

use super::days::{self, Layout};
use super::schema::{StoreError, db_err};

/// One partition, in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// The most hours of interim slices written at once for a flow the trail did not see
/// through them (found by a dump, a DESTROY without its NEW, the events' clock jumping
/// ahead): a week, the span a lookup resolves an interim slice's end over. Its start is
/// stored as the kernel gave it. Unbounded, a start stamped by a clock not yet set (a
/// gateway without a real-time clock boots in 1970 until NTP) made one DESTROY write 472,223
/// slices, 56 s of the writer, and the seal would have made a table for every day since.
pub const BACKFILL_HOURS: i32 = 24 * 7;

/// The hour (since the epoch) an instant in milliseconds falls in.
pub fn hour_of(ms: i64) -> i32 {
    ms.div_euclid(HOUR_MS) as i32
}

/// The first millisecond after `hour`.
pub fn hour_end_ms(hour: i32) -> i64 {
    (i64::from(hour) + 1) * HOUR_MS
}

/// A start in nanoseconds as stored: rounded down to the millisecond.
pub fn start_ms(ns: u64) -> i64 {
    (ns / 1_000_000) as i64
}

/// An end in nanoseconds as stored: rounded up, so the stored interval holds the true one.
pub fn end_ms(ns: u64) -> i64 {
    ns.div_ceil(1_000_000) as i64
}

/// The order of a sealed hour: public port and address first, which is what `who` asks by.
/// DuckDB keeps a min/max per column per row group of 122,880 rows: with the port first (a
/// few public addresses, 65,536 ports each) a row group holds a narrow range of ports and a
/// lookup reads one row group of the hour; with the address first each row group held every
/// port of an address, and interim slices apart made a second range of every port: a lookup
/// read three to four. IPv6 flows come after the IPv4 ones, so that the 16-byte columns stay
/// NULL in runs (interleaved, they cost 2.3 B more per slice).
pub const SEAL_ORDER: &str = "hour, pub6 IS NOT NULL, pub_port, pub6, pub4, start_ms";

/// The order of a day's ends table: the sealed order without the hour (a lookup knows the
/// flow's start, not the hour of its end).
const ENDS_ORDER: &str = "pub6 IS NOT NULL, pub_port, pub6, pub4, start_ms";

/// One UTC day, in milliseconds.
const DAY_MS: i64 = 24 * HOUR_MS;

/// The partitions' state: the newest sealed hour and the retention horizon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrailState {
    /// Hours up to this one are sorted into `flow_trail`.
    pub sealed_hour: Option<i32>,
    /// Milliseconds since the epoch before which retention removed the trail.
    pub retained_from_ms: Option<i64>,
    /// The oldest sealed hour with slices still in `trail_recent` (written late).
    pub late_hour: Option<i32>,
}

/// Reads the partitions' state.
pub fn state(conn: &Connection) -> Result<TrailState, StoreError> {
    conn.query_row(
        "SELECT max(sealed_hour), max(retained_from), min(late_hour) FROM trail_state",
        [],
        |r| {
            Ok(TrailState {
                sealed_hour: r.get(0)?,
                retained_from_ms: r.get(1)?,
                late_hour: r.get(2)?,
            })
        },
    )
    .map_err(db_err("reading the trail's partition state"))
}

/// Moves the slices of every hour up to `hour` from `trail_recent` into `flow_sealed`,
/// sorted, with their destinations in the hour's dictionary; returns the slices moved. The
/// conntrack id and sequence number are dropped: they serve recovery, which the checkpoint
/// taken before this has made moot. In one transaction.
pub fn seal(conn: &Connection, hour: i32) -> Result<usize, StoreError> {
    conn.execute_batch("BEGIN TRANSACTION")
        .map_err(db_err("beginning a seal"))?;
    match seal_in_transaction(conn, hour).and_then(|n| {
        conn.execute_batch("COMMIT")
            .map_err(db_err("committing a seal"))?;
        Ok(n)
    }) {
        Ok(n) => Ok(n),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// `seal` inside the caller's transaction.
pub fn seal_in_transaction(conn: &Connection, hour: i32) -> Result<usize, StoreError> {
    seal_in_chunks(conn, hour, SEAL_CHUNK, Layout::Daily)
}

/// `seal_in_transaction`, each sorted insert of at most `chunk` slices, into the tables of
/// `layout`.
fn seal_in_chunks(
    conn: &Connection,
    hour: i32,
    chunk: i64,
    layout: Layout,
) -> Result<usize, StoreError> {
    let (n, first, in_days): (i64, Option<i32>, duckdb::types::Value) = conn
        .query_row(
            "SELECT count(*), min(hour), list(DISTINCT hour // 24) FROM trail_recent
             WHERE hour <= ?",
            params![hour],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(db_err("counting the slices to seal"))?;
    let Some(first) = first else {
        return Ok(0);
    };
    let days: Vec<i32> = match layout {
        Layout::Single => vec![days::day_of(first)],
        Layout::Daily => {
            let days = days::from_value(&in_days);
            days::ensure(conn, &days)?;
            days
        }
    };
    // The hours of each day's dictionary this seal writes to (all of them in one table in
    // the single layout).
    let span = |d: i32| match layout {
        Layout::Single => (first, hour),
        Layout::Daily => (first.max(d * 24), hour.min(d * 24 + 23)),
    };
    let mut dictionaries = Vec::new();
    for &d in &days {
        let (lo, hi) = span(d);
        let dst = days::dst_table(layout, d);
        // Hours sealed before (late slices of an old hour) keep their dictionary entries; new
        // destinations get the ids after the hour's last.
        conn.execute_batch(&format!(
            "INSERT INTO {dst}
                 SELECT n.hour, (coalesce(m.top + 1, 0)
                        + row_number() OVER (PARTITION BY n.hour ORDER BY n.dkey, n.dst_port) - 1)::UINTEGER,
                        n.dst4, n.dst6, n.dst_port
                 FROM (SELECT DISTINCT hour, nt_addr(dst4, dst6) AS dkey, dst4, dst6, dst_port
                       FROM trail_recent WHERE hour BETWEEN {lo} AND {hi}) n
                 LEFT JOIN (SELECT hour, max(id) AS top FROM {dst}
                            WHERE hour BETWEEN {lo} AND {hi} GROUP BY hour) m ON m.hour = n.hour
                 WHERE NOT EXISTS (
                     SELECT 1 FROM {dst} d
                     WHERE d.hour BETWEEN {lo} AND {hi} AND d.hour = n.hour
                       AND nt_addr(d.dst4, d.dst6) = n.dkey AND d.dst_port = n.dst_port)
                 ORDER BY n.hour, n.dkey, n.dst_port;"
        ))
        .map_err(db_err(format!("writing the destinations of the hours {lo}..={hi}")))?;
        dictionaries.push(format!(
            "SELECT * FROM {dst} WHERE hour BETWEEN {lo} AND {hi}"
        ));
    }
    // The slices joined to their ids go to a table of the file, compressed and evicted under
    // pressure (a temp table held them in memory, uncompressed: 253 MiB for 2 M slices), and
    // are sorted from there in chunks, each within DuckDB's limit whatever the hour's size.
    conn.execute_batch(&format!(
        "CREATE TABLE nt_seal AS
             SELECT s.hour, s.flags, s.proto, s.zone, s.pub4, s.pub6, s.pub_port, s.src4, s.src6,
                    s.src_port, d.id, s.dnat4, s.dnat6, s.dnat_port, s.start_ms, s.end_ms,
                    s.end_lo_ms, s.packets_out, s.bytes_out, s.packets_in, s.bytes_in
             FROM trail_recent s
             JOIN ({}) d
               ON d.hour = s.hour AND nt_addr(d.dst4, d.dst6) = nt_addr(s.dst4, s.dst6)
                  AND d.dst_port = s.dst_port
             WHERE s.hour <= {hour};",
        dictionaries.join(" UNION ALL ")
    ))
    .map_err(db_err(format!("sealing the hours {first}..={hour}")))?;
    for (h, v6, lo, hi) in seal_chunks(conn, chunk)? {
        conn.execute(
            &format!(
                "INSERT INTO {} SELECT * FROM nt_seal
                 WHERE hour = ? AND (pub6 IS NOT NULL) = ? AND pub_port BETWEEN ? AND ?
                 ORDER BY {SEAL_ORDER}",
                days::sealed_table(layout, days::day_of(h))
            ),
            params![h, v6, lo, hi],
        )
        .map_err(db_err(format!(
            "sealing hour {h}, public ports {lo}..={hi} of IPv{}",
            if v6 { 6 } else { 4 }
        )))?;
    }
    if layout == Layout::Daily {
        write_ends(conn, hour)?;
    }
    conn.execute_batch(&format!(
        "DROP TABLE nt_seal;
         DELETE FROM trail_recent WHERE hour <= {hour};
         UPDATE trail_state SET sealed_hour = greatest(coalesce(sealed_hour, {hour}), {hour});"
    ))
    .map_err(db_err(format!("sealing the hours {first}..={hour}")))?;
    Ok(n as usize)
}

/// Copies the final slices of the hours up to `hour` whose flows lived through a whole hour
/// (they started two hours or more before the one they ended in) into the ends tables of
/// their start days, each rewritten sorted by public port and address: rows appended in the
/// order of each seal would put every port in every row group, and a lookup would read the
/// whole table. A flow that ended in the hour after its start is not copied (96 % of the
/// flows with an interim slice on the generated day, which made the ends 31 MiB a day and
/// the file 25.7 B per flow): a lookup finds it in the next hour. Starts before the
/// retention horizon are left out (their day is gone; lookups of them search the hours
/// after, as before). Inside the seal's transaction, before its slices leave `trail_recent`.
fn write_ends(conn: &Connection, hour: i32) -> Result<(), StoreError> {
    let horizon = state(conn)?.retained_from_ms.unwrap_or(0);
    let long = format!(
        "hour <= {hour} AND flags & 1 = 1 AND start_ms < (hour - 1)::BIGINT * {HOUR_MS}
         AND start_ms >= {horizon}"
    );
    let in_days: duckdb::types::Value = conn
        .query_row(
            &format!(
                "SELECT list(DISTINCT (start_ms // {DAY_MS})::INTEGER) FROM trail_recent
                 WHERE {long}"
            ),
            [],
            |r| r.get(0),
        )
        .map_err(db_err("listing the start days of the flows that end"))?;
    let start_days = days::from_value(&in_days);
    days::ensure(conn, &start_days)?;
    for d in start_days {
        let table = days::ends_table(d);
        conn.execute_batch(&format!(
            "CREATE TABLE nt_ends AS SELECT * FROM (
                 SELECT * FROM {table}
                 UNION ALL
                 SELECT * REPLACE (NULL::UINTEGER AS ct_id, NULL::UBIGINT AS seq)
                 FROM trail_recent
                 WHERE {long} AND start_ms BETWEEN {} AND {})
             ORDER BY {ENDS_ORDER};
             DROP TABLE {table};
             ALTER TABLE nt_ends RENAME TO {table};",
            i64::from(d) * DAY_MS,
            i64::from(d + 1) * DAY_MS - 1
        ))
        .map_err(db_err(format!(
            "writing the ends of flows started in {table}"
        )))?;
    }
    Ok(())
}

/// The most slices one sorted insert of a seal takes. The memory a sorted insert needs grows
/// with its rows: an hour of 10 M slices in one statement ran out of memory at a limit of
/// 128 MiB (sealed at 256); in chunks of this size it seals at 64 MiB.
const SEAL_CHUNK: i64 = 1_000_000;

/// The pieces `nt_seal` is sorted into `flow_sealed` in, in the sealed order: (hour, IPv6,
/// first port, last port), each of at most `chunk` slices unless one run of 256 ports holds
/// more. Consecutive pieces of the sealed order, so that the hour ends up sorted whole.
fn seal_chunks(conn: &Connection, chunk: i64) -> Result<Vec<(i32, bool, u16, u16)>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT hour, pub6 IS NOT NULL, pub_port // 256, count(*) FROM nt_seal
             GROUP BY ALL ORDER BY ALL",
        )
        .map_err(db_err("counting the slices to seal by port"))?;
    let runs: Vec<(i32, bool, u16, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .and_then(|rows| rows.collect())
        .map_err(db_err("counting the slices to seal by port"))?;
    let mut chunks: Vec<(i32, bool, u16, u16, i64)> = Vec::new();
    for (hour, v6, run, n) in runs {
        let (lo, hi) = (run * 256, run * 256 + 255);
        match chunks.last_mut() {
            Some(c) if (c.0, c.1) == (hour, v6) && c.4 + n <= chunk => {
                c.3 = hi;
                c.4 += n;
            }
            _ => chunks.push((hour, v6, lo, hi, n)),
        }
    }
    Ok(chunks.into_iter().map(|c| (c.0, c.1, c.2, c.3)).collect())
}

/// Records that `hour`, already sealed, lacks slices that `trail_recent` or the open flows
/// hold (written late, or not yet written): lookups from that hour on read them too.
pub fn note_late(conn: &Connection, hour: i32) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE trail_state SET late_hour = least(coalesce(late_hour, ?), ?)",
        params![hour, hour],
    )
    .map_err(db_err(format!("recording late slices of hour {hour}")))?;
    Ok(())
}

/// After a seal moved every late slice: the oldest sealed hour still missing slices (of
/// flows opened since the last sweep), or none.
pub fn set_late(conn: &Connection, hour: Option<i32>) -> Result<(), StoreError> {
    conn.execute("UPDATE trail_state SET late_hour = ?", params![hour])
        .map_err(db_err("updating the late-slice mark"))?;
    Ok(())
}

/// Removes every whole day before the one `from_hour` falls in (dropping its tables, while
/// ingest and lookups go on: no row is rewritten) and records the horizon, the start of
/// that day; returns the slices removed.
pub fn retain(conn: &Connection, from_hour: i32) -> Result<usize, StoreError> {
    let first_kept = days::day_of(from_hour);
    let from_ms = i64::from(first_kept) * 24 * HOUR_MS;
    super::event_log::in_transaction(conn, "applying retention", |conn| {
        let recent = conn
            .execute(
                "DELETE FROM trail_recent WHERE hour < ?",
                params![first_kept * 24],
            )
            .map_err(db_err(format!(
                "removing unsealed slices before {from_ms} ms"
            )))?;
        let sealed = days::drop_before(conn, first_kept)?;
        conn.execute(
            "UPDATE trail_state SET retained_from = greatest(coalesce(retained_from, ?1), ?1)",
            params![from_ms],
        )
        .map_err(db_err("recording the retention horizon"))?;
        Ok(recent + sealed)
    })
}

/// The oldest instant the trail holds (its oldest slice's start, else its end), in ms.
pub fn oldest_ms(conn: &Connection) -> Result<Option<i64>, StoreError> {
    // The oldest day's table, and the legacy one while there is one.
    let oldest = days::list(conn)?
        .first()
        .map(|d| days::sealed_table(Layout::Daily, *d));
    let legacy = days::legacy_until(conn)?.map(|_| days::LEGACY_SEALED.to_string());
    let sealed: String = legacy
        .into_iter()
        .chain(oldest)
        .map(|t| {
            format!(
                "SELECT min(coalesce(start_ms, end_ms)) AS m FROM {t}
                 WHERE hour = (SELECT min(hour) FROM {t}) UNION ALL "
            )
        })
        .collect();
    conn.query_row(
        &format!(
            "SELECT min(m) FROM (
                {sealed}
                SELECT min(coalesce(start_ms, end_ms)) AS m FROM trail_recent
                UNION ALL SELECT min(start_us) // 1000 FROM open_flows
                UNION ALL SELECT min(start_us) // 1000 FROM open_journal)"
        ),
        [],
        |r| r.get(0),
    )
    .map_err(db_err("reading the trail's oldest instant"))
}

/// Part of migration 8, inside its transaction: turns the version-7 event rows into slices.
/// Finished flows become a final slice plus an interim one for each earlier hour; open
/// flows become the open-flow checkpoint. Logs its progress a day at a time.
pub fn move_events(conn: &Connection) -> Result<(), StoreError> {
    let t0 = std::time::Instant::now();
    // The join of starts and ends, once (the old `flows` view); reply source and port are
    // not in it, so flows moved from before version 8 carry no destination-NAT columns.
    conn.execute_batch(
        "CREATE TEMP TABLE nt_moved AS
         SELECT epoch_us(start) // 1000 AS start_ms,
                CASE WHEN \"end\" IS NULL THEN NULL ELSE (epoch_us(\"end\") + 999) // 1000 END AS end_ms,
                epoch_us(end_lo) // 1000 AS end_lo_ms,
                (CASE WHEN \"end\" IS NOT NULL THEN 1 ELSE 0 END
                 | CASE WHEN found_by_dump THEN 2 ELSE 0 END
                 | CASE WHEN end_inexact THEN 4 ELSE 0 END
                 | CASE WHEN start_seq IS NULL AND \"end\" IS NOT NULL THEN 16 ELSE 0 END)::UTINYINT AS final_flags,
                proto_num AS proto, zone, reply_dst, public_port, orig_src, internal_port,
                orig_dst, dst_port, packets_out, bytes_out, packets_in, bytes_in, ct_id,
                start_seq, end_seq
         FROM flows",
    )
    .map_err(db_err("joining the version-7 events into flows"))?;
    let (flows, first, last): (i64, Option<i32>, Option<i32>) = conn
        .query_row(
            "SELECT count(*), min(end_ms // 3600000)::INTEGER, max(end_ms // 3600000)::INTEGER
             FROM nt_moved",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(db_err("counting the flows to move"))?;
    info!(
        flows,
        secs = t0.elapsed().as_secs_f64(),
        "migration 8: version-7 events joined into flows"
    );
    if let (Some(first), Some(last)) = (first, last) {
        let mut day = first;
        while day <= last {
            let upto = (day + 23).min(last);
            let n = conn
                .execute(
                    &format!(
                        "INSERT INTO trail_recent
                         SELECT h AS hour,
                                CASE WHEN h = end_ms // 3600000 THEN final_flags
                                     ELSE final_flags & 18 END::UTINYINT AS flags,
                                proto, zone, nt_v4(reply_dst) AS pub4, nt_v6(reply_dst) AS pub6,
                                public_port AS pub_port,
                                nt_v4(orig_src), nt_v6(orig_src), internal_port,
                                nt_v4(orig_dst), nt_v6(orig_dst), dst_port, NULL, NULL, NULL,
                                start_ms, CASE WHEN h = end_ms // 3600000 THEN end_ms END,
                                CASE WHEN h = end_ms // 3600000 THEN end_lo_ms END,
                                CASE WHEN h = end_ms // 3600000 THEN packets_out END,
                                CASE WHEN h = end_ms // 3600000 THEN bytes_out END,
                                CASE WHEN h = end_ms // 3600000 THEN packets_in END,
                                CASE WHEN h = end_ms // 3600000 THEN bytes_in END,
                                NULL, NULL
                         FROM (SELECT *, unnest(generate_series(
                                   coalesce(start_ms, end_ms) // 3600000, end_ms // 3600000)) AS h
                               FROM nt_moved WHERE end_ms IS NOT NULL)
                         WHERE h BETWEEN {day} AND {upto}"
                    ),
                    [],
                )
                .map_err(db_err(format!("moving the hours {day}..={upto} of flows")))?;
            seal_in_chunks(conn, upto, SEAL_CHUNK, Layout::Single)?;
            info!(
                hours = format!("{day}..={upto}"),
                slices = n,
                secs = t0.elapsed().as_secs_f64(),
                "migration 8: a day of flows sealed"
            );
            day = upto + 1;
        }
    }
    // The flows still open become the checkpoint, with what only their start row holds.
    conn.execute_batch(
        "DELETE FROM open_flows;
         INSERT INTO open_flows
         SELECT e.ct_id, e.zone, e.proto, e.orig_src, e.orig_dst, e.orig_sport, e.orig_dport,
                e.reply_src, e.reply_dst, e.reply_sport, e.reply_dport, e.family,
                m.start_ms * 1000, e.kind = 3
         FROM nt_moved m JOIN conntrack_events e ON e.seq = m.start_seq
         WHERE m.end_ms IS NULL;
         DELETE FROM open_flows_checkpoint;
         INSERT INTO open_flows_checkpoint VALUES (0, now()::TIMESTAMP);
         DROP TABLE nt_moved;",
    )
    .map_err(db_err("moving the open flows into the checkpoint"))?;
    info!(
        flows,
        secs = t0.elapsed().as_secs_f64(),
        "migration 8: events moved into hourly slices"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn a_seal_in_chunks_sorts_the_hours_whole() {
        let dir = std::env::temp_dir().join(format!("nattrail-chunks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        let conn = db.connect().unwrap();
        // 2,400 slices over 2 hours, one in five IPv6, public ports spread over every run of
        // 256, destinations repeating; written in no order.
        conn.execute_batch(
            "INSERT INTO trail_recent
             SELECT 10 + i % 2, 1, 6, 0,
                    CASE WHEN i % 5 = 0 THEN NULL ELSE (i * 7) % 3 END,
                    CASE WHEN i % 5 = 0 THEN 42::UHUGEINT END,
                    ((i * 40503) % 65536)::USMALLINT, 1, NULL, (i % 60000)::USMALLINT,
                    i % 37, NULL, 443, NULL, NULL, NULL, 36000000 + i, 36000001 + i, NULL,
                    1, 2, 3, 4, i, i
             FROM range(2400) t(i)",
        )
        .unwrap();
        let want: Vec<(i32, Option<u32>, u16, i64)> = conn
            .prepare(&format!(
                "SELECT hour, pub4, pub_port, start_ms FROM trail_recent ORDER BY {SEAL_ORDER}"
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        conn.execute_batch("BEGIN TRANSACTION").unwrap();
        conn.execute_batch("CREATE TABLE nt_seal AS SELECT * FROM trail_recent")
            .unwrap();
        let chunks = seal_chunks(&conn, 100).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        // Pieces of at most 100 slices (a run of 256 ports holds a handful here), in order:
        // 960 IPv4 and 240 IPv6 slices an hour make at least 2 x (10 + 3).
        assert!(chunks.len() >= 26, "{}", chunks.len());
        assert!(
            chunks
                .windows(2)
                .all(|w| (w[0].0, w[0].1, w[0].3) < (w[1].0, w[1].1, w[1].2))
        );
        conn.execute_batch("BEGIN TRANSACTION").unwrap();
        assert_eq!(seal_in_chunks(&conn, 11, 100, Layout::Daily).unwrap(), 2400);
        conn.execute_batch("COMMIT").unwrap();
        let got: Vec<(i32, Option<u32>, u16, i64)> = conn
            .prepare(
                "SELECT hour, pub4, pub_port, start_ms FROM flow_sealed_19700101 ORDER BY rowid",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // Compared row by row: the first slice out of order, if any.
        assert_eq!(got.len(), want.len());
        assert_eq!(got.iter().zip(&want).position(|(g, w)| g != w), None);
        let left: (i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM trail_recent),
                        (SELECT count(*) FROM duckdb_tables() WHERE table_name = 'nt_seal')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(left, (0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
