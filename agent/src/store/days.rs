//! The sealed trail's daily tables: one pair (`flow_sealed_YYYYMMDD`, `trail_dst_YYYYMMDD`)
//! per UTC day, the list of them in `trail_state.days`, the views `flow_sealed` and
//! `trail_dst` over them all, retention by whole days, and the one-time split of the single
//! pair of tables of schema 12.
//!
//! Why tables and not one table: DuckDB loads a table's row-group metadata (about 5.6 KiB per
//! row group, outside its memory limit) for every row group a scan considers, so a lookup
//! in one table grows with the history kept: on 7 days the first lookup of a process took
//! 35-75 ms and 18-26 MiB against 9-13 ms and 6 MiB on one day. A lookup names the tables
//! of its window only.

use duckdb::Connection;
use tracing::info;

use super::schema::{StoreError, db_err};

/// Which tables sealed hours go to: a day's pair, or (inside migration 8, which predates
/// version 13) the one pair of that schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `flow_sealed` and `trail_dst` are tables holding every hour (schema 8 to 12).
    Single,
    /// One pair of tables per day (schema 13 on).
    Daily,
}

/// The UTC day (since the epoch) an hour falls in.
pub fn day_of(hour: i32) -> i32 {
    hour.div_euclid(24)
}

/// The day's date as the tables are named: YYYYMMDD. Hours come from u64 nanoseconds, so
/// every day is between 1970 and 2554; anything else is named by its number.
fn date(day: i32) -> String {
    chrono::NaiveDate::from_num_days_from_ce_opt(day.saturating_add(719_163))
        .map(|d| d.format("%Y%m%d").to_string())
        .filter(|s| s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| format!("n{}", day.unsigned_abs()))
}

/// The sealed slices of a day (of every hour, in the single layout).
pub fn sealed_table(layout: Layout, day: i32) -> String {
    match layout {
        Layout::Single => "flow_sealed".into(),
        Layout::Daily => format!("flow_sealed_{}", date(day)),
    }
}

/// The destination dictionary of a day's hours.
pub fn dst_table(layout: Layout, day: i32) -> String {
    match layout {
        Layout::Single => "trail_dst".into(),
        Layout::Daily => format!("trail_dst_{}", date(day)),
    }
}

/// The columns of a day's sealed slices (as `flow_sealed` of schema 8): sorted by public
/// address and port within each hour, the destination an index into the hour's dictionary.
const SEALED_COLUMNS: &str = "(
    hour INTEGER NOT NULL, flags UTINYINT NOT NULL, proto UTINYINT NOT NULL,
    zone USMALLINT NOT NULL, pub4 UINTEGER, pub6 UHUGEINT, pub_port USMALLINT NOT NULL,
    src4 UINTEGER, src6 UHUGEINT, src_port USMALLINT NOT NULL, dst_id UINTEGER NOT NULL,
    dnat4 UINTEGER, dnat6 UHUGEINT, dnat_port USMALLINT, start_ms BIGINT, end_ms BIGINT,
    end_lo_ms BIGINT, packets_out UBIGINT, bytes_out UBIGINT, packets_in UBIGINT,
    bytes_in UBIGINT)";

/// The columns of a day's destination dictionary.
const DST_COLUMNS: &str = "(hour INTEGER NOT NULL, id UINTEGER NOT NULL, dst4 UINTEGER, dst6 UHUGEINT, dst_port USMALLINT NOT NULL)";

/// The days with tables, oldest first.
pub fn list(conn: &Connection) -> Result<Vec<i32>, StoreError> {
    let v: duckdb::types::Value = conn
        .query_row("SELECT days FROM trail_state", [], |r| r.get(0))
        .map_err(db_err("reading the trail's days"))?;
    Ok(from_value(&v))
}

/// The days of a `trail_state.days` value (NULL: none).
pub(crate) fn from_value(v: &duckdb::types::Value) -> Vec<i32> {
    use duckdb::types::Value;
    let mut days: Vec<i32> = match v {
        Value::List(items) => items
            .iter()
            .filter_map(|i| match i {
                Value::Int(d) => Some(*d),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    days.sort_unstable();
    days.dedup();
    days
}

/// Records `days` as the tables there are and points the views at them. Inside the caller's
/// transaction, with the tables' creation or removal.
fn set_list(conn: &Connection, days: &[i32]) -> Result<(), StoreError> {
    let list = days
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let view = |name: &str, table: fn(Layout, i32) -> String| {
        let mut sql = format!("CREATE OR REPLACE VIEW {name} AS SELECT * FROM {name}_empty");
        for d in days {
            sql.push_str(&format!(
                " UNION ALL SELECT * FROM {}",
                table(Layout::Daily, *d)
            ));
        }
        sql
    };
    conn.execute_batch(&format!(
        "UPDATE trail_state SET days = [{list}]::INTEGER[];
         {};
         {};",
        view("flow_sealed", sealed_table),
        view("trail_dst", dst_table)
    ))
    .map_err(db_err("recording the trail's days"))
}

/// Creates the tables of those of `wanted` that have none yet; inside the caller's
/// transaction.
pub fn ensure(conn: &Connection, wanted: &[i32]) -> Result<(), StoreError> {
    let mut days = list(conn)?;
    let missing: Vec<i32> = wanted
        .iter()
        .copied()
        .filter(|d| !days.contains(d))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for d in &missing {
        let (s, t) = (
            sealed_table(Layout::Daily, *d),
            dst_table(Layout::Daily, *d),
        );
        conn.execute_batch(&format!(
            "CREATE TABLE {s} {SEALED_COLUMNS}; CREATE TABLE {t} {DST_COLUMNS};"
        ))
        .map_err(db_err(format!("creating the tables of day {}", date(*d))))?;
        days.push(*d);
    }
    days.sort_unstable();
    set_list(conn, &days)
}

/// Drops the tables of every day before `first_kept`; inside the caller's transaction.
/// Returns the slices they held.
pub fn drop_before(conn: &Connection, first_kept: i32) -> Result<usize, StoreError> {
    let days = list(conn)?;
    let (gone, kept): (Vec<i32>, Vec<i32>) = days.into_iter().partition(|d| *d < first_kept);
    if gone.is_empty() {
        return Ok(0);
    }
    let mut removed = 0usize;
    for d in &gone {
        let n: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {}", sealed_table(Layout::Daily, *d)),
                [],
                |r| r.get(0),
            )
            .map_err(db_err(format!("counting the slices of day {}", date(*d))))?;
        removed += n as usize;
    }
    // The views first: a table a view names cannot be dropped.
    set_list(conn, &kept)?;
    for d in &gone {
        conn.execute_batch(&format!(
            "DROP TABLE {}; DROP TABLE {};",
            sealed_table(Layout::Daily, *d),
            dst_table(Layout::Daily, *d)
        ))
        .map_err(db_err(format!("dropping the tables of day {}", date(*d))))?;
    }
    Ok(removed)
}

/// Part of migration 13, inside its transaction: moves each day of the single tables
/// (renamed `flow_sealed_v12`, `trail_dst_v12`) into its own pair, in their order (each
/// hour stays sorted), logging each day.
pub fn split(conn: &Connection) -> Result<(), StoreError> {
    let t0 = std::time::Instant::now();
    conn.execute_batch(&format!(
        "CREATE TABLE flow_sealed_empty {SEALED_COLUMNS};
         CREATE TABLE trail_dst_empty {DST_COLUMNS};"
    ))
    .map_err(db_err("creating the empty day tables"))?;
    let mut stmt = conn
        .prepare("SELECT DISTINCT hour // 24 FROM trail_dst_v12 ORDER BY 1")
        .map_err(db_err("listing the sealed days"))?;
    let days: Vec<i32> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(db_err("listing the sealed days"))?;
    set_list(conn, &[])?;
    for d in &days {
        ensure(conn, &[*d])?;
        let (lo, hi) = (d * 24, d * 24 + 23);
        // Insertion order is kept (DuckDB's preserve_insertion_order), so each hour stays
        // in the sealed order without a sort.
        let n = conn
            .execute(
                &format!(
                    "INSERT INTO {} SELECT * FROM flow_sealed_v12 WHERE hour BETWEEN {lo} AND {hi}",
                    sealed_table(Layout::Daily, *d)
                ),
                [],
            )
            .map_err(db_err(format!("moving the slices of day {}", date(*d))))?;
        conn.execute(
            &format!(
                "INSERT INTO {} SELECT * FROM trail_dst_v12 WHERE hour BETWEEN {lo} AND {hi}",
                dst_table(Layout::Daily, *d)
            ),
            [],
        )
        .map_err(db_err(format!(
            "moving the destinations of day {}",
            date(*d)
        )))?;
        info!(
            day = date(*d),
            slices = n,
            secs = t0.elapsed().as_secs_f64(),
            "migration 13: a day of sealed hours moved into its tables"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn a_schema_12_trail_is_split_into_days_in_its_order() {
        let dir = std::env::temp_dir().join(format!("nattrail-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        // Three hours across a midnight (days 19,675 and 19,676), 300 slices each, in an
        // order no sort by any column gives back.
        let rows = "SELECT 472_222 + i // 300, 1, 6, 0, (i * 7919) % 1000, NULL,
                           ((i * 40503) % 65536)::USMALLINT, 1, NULL, 7, i % 5, NULL, NULL,
                           NULL, 1700000000000 + i, 1700000000001 + i, NULL, 1, 2, 3, 4
                    FROM range(900) t(i)";
        {
            let c = crate::store::schema::database_at_version(&path, 12);
            c.execute_batch(&format!(
                "INSERT INTO flow_sealed {rows};
                 INSERT INTO trail_dst SELECT 472_222 + h, i, i, NULL, 443
                 FROM range(3) a(h), range(5) b(i);
                 UPDATE trail_state SET sealed_hour = 472_224;"
            ))
            .unwrap();
        }
        let db = Database::open_rw(&path).unwrap();
        let c = db.connect().unwrap();
        assert_eq!(list(&c).unwrap(), [19_675, 19_676]);
        let read = |sql: &str| -> Vec<(i32, u32, u16, i64)> {
            c.prepare(sql)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let want = read(&format!(
            "SELECT hour, pub4, pub_port, start_ms FROM ({rows}) t(hour, f, p, z, pub4, pub6,
             pub_port, s4, s6, sp, d, n4, n6, np, start_ms, e, el, a, b, c2, d2)"
        ));
        let got = [
            read("SELECT hour, pub4, pub_port, start_ms FROM flow_sealed_20231114 ORDER BY rowid"),
            read("SELECT hour, pub4, pub_port, start_ms FROM flow_sealed_20231115 ORDER BY rowid"),
        ]
        .concat();
        assert_eq!(
            (got.len(), got.iter().zip(&want).position(|(g, w)| g != w)),
            (900, None)
        );
        let dst: (i64, i64, i64) = c
            .query_row(
                "SELECT (SELECT count(*) FROM trail_dst_20231114),
                        (SELECT count(*) FROM trail_dst_20231115),
                        (SELECT count(*) FROM flow_trail)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(dst, (10, 5, 900));
        let old: i64 = c
            .query_row(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '%_v12'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn days_are_named_by_their_utc_date() {
        assert_eq!(sealed_table(Layout::Daily, 0), "flow_sealed_19700101");
        assert_eq!(dst_table(Layout::Daily, 20_454), "trail_dst_20260101");
        assert_eq!(day_of(-1), -1);
        assert_eq!(sealed_table(Layout::Daily, -1), "flow_sealed_19691231");
        assert_eq!(sealed_table(Layout::Single, 5), "flow_sealed");
    }
}
