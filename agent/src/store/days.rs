//! The sealed trail's daily tables: one pair (`flow_sealed_YYYYMMDD`, `trail_dst_YYYYMMDD`)
//! per UTC day, the list of them in `trail_state.days`, the views `flow_sealed` and
//! `trail_dst` over them all, retention by whole days, and the single pair of tables of
//! schema 12, kept as it was and read beside the days until retention removes it.
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

/// The final slices, sealed since schema 14, of the flows of a day (by their start) that
/// lived through a whole hour: where a lookup that found such a flow by an interim slice
/// reads its end, instead of searching the hours after.
pub fn ends_table(day: i32) -> String {
    format!("flow_ends_{}", date(day))
}

/// The slices a trail of schema 12 or older had sealed, kept where they were by migration
/// 13: copying months of them into daily tables would keep the upgraded agent from
/// capturing for as long (8-10 s a day of 40 M flows). Read beside the days, for the hours
/// up to `trail_state.legacy_until`, until retention removes them.
pub const LEGACY_SEALED: &str = "flow_sealed_before13";

/// The destinations of the legacy slices.
pub const LEGACY_DST: &str = "trail_dst_before13";

/// The columns of a day's sealed slices (as `flow_sealed` of schema 8): sorted by public
/// address and port within each hour, the destination an index into the hour's dictionary.
const SEALED_COLUMNS: &str = "(
    hour INTEGER NOT NULL, flags UTINYINT NOT NULL, proto UTINYINT NOT NULL,
    zone USMALLINT NOT NULL, pub4 UINTEGER, pub6 UHUGEINT, pub_port USMALLINT NOT NULL,
    src4 UINTEGER, src6 UHUGEINT, src_port USMALLINT NOT NULL, dst_id UINTEGER NOT NULL,
    dnat4 UINTEGER, dnat6 UHUGEINT, dnat_port USMALLINT, start_ms BIGINT, end_ms BIGINT,
    end_lo_ms BIGINT, packets_out UBIGINT, bytes_out UBIGINT, packets_in UBIGINT,
    bytes_in UBIGINT)";

/// The columns of a day's ends: those of `trail_recent` (the destination itself, not an
/// index into a dictionary; the conntrack id and sequence number NULL).
const ENDS_COLUMNS: &str = "(
    hour INTEGER NOT NULL, flags UTINYINT NOT NULL, proto UTINYINT NOT NULL,
    zone USMALLINT NOT NULL, pub4 UINTEGER, pub6 UHUGEINT, pub_port USMALLINT NOT NULL,
    src4 UINTEGER, src6 UHUGEINT, src_port USMALLINT NOT NULL, dst4 UINTEGER, dst6 UHUGEINT,
    dst_port USMALLINT NOT NULL, dnat4 UINTEGER, dnat6 UHUGEINT, dnat_port USMALLINT,
    start_ms BIGINT, end_ms BIGINT, end_lo_ms BIGINT, packets_out UBIGINT, bytes_out UBIGINT,
    packets_in UBIGINT, bytes_in UBIGINT, ct_id UINTEGER, seq UBIGINT)";

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

/// The last hour the legacy tables hold, when they are there.
pub fn legacy_until(conn: &Connection) -> Result<Option<i32>, StoreError> {
    conn.query_row("SELECT legacy_until FROM trail_state", [], |r| r.get(0))
        .map_err(db_err("reading the legacy tables' last hour"))
}

/// Records `days` as the tables there are and points the views at them (and at the legacy
/// tables while there are some). Inside the caller's transaction, with the tables' creation
/// or removal.
fn set_list(conn: &Connection, days: &[i32]) -> Result<(), StoreError> {
    let list = days
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let legacy = legacy_until(conn)?.is_some();
    let view = |name: &str, old: &str, table: fn(Layout, i32) -> String| {
        let mut sql = format!("CREATE OR REPLACE VIEW {name} AS SELECT * FROM {name}_empty");
        if legacy {
            sql.push_str(&format!(" UNION ALL SELECT * FROM {old}"));
        }
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
        view("flow_sealed", LEGACY_SEALED, sealed_table),
        view("trail_dst", LEGACY_DST, dst_table)
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
        let (s, t, e) = (
            sealed_table(Layout::Daily, *d),
            dst_table(Layout::Daily, *d),
            ends_table(*d),
        );
        conn.execute_batch(&format!(
            "CREATE TABLE {s} {SEALED_COLUMNS}; CREATE TABLE {t} {DST_COLUMNS};
             CREATE TABLE {e} {ENDS_COLUMNS};"
        ))
        .map_err(db_err(format!("creating the tables of day {}", date(*d))))?;
        days.push(*d);
    }
    days.sort_unstable();
    set_list(conn, &days)
}

/// The oldest of the `keep` newest days whose tables hold slices, or `None` when fewer do.
/// Retention keeps that many whatever the events' clock says. Read newest first: the newest
/// days are the ones that hold slices, so this is a statement or two.
pub fn oldest_of_newest_holding(conn: &Connection, keep: usize) -> Result<Option<i32>, StoreError> {
    let mut found = 0;
    for d in list(conn)?.into_iter().rev() {
        let n: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {}", sealed_table(Layout::Daily, d)),
                [],
                |r| r.get(0),
            )
            .map_err(db_err(format!("counting the slices of day {}", date(d))))?;
        found += usize::from(n > 0);
        if found == keep {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// Drops the tables of every day before `first_kept`; inside the caller's transaction.
/// Returns the slices they held.
pub fn drop_before(conn: &Connection, first_kept: i32) -> Result<usize, StoreError> {
    let mut removed = drop_legacy_before(conn, first_kept * 24)?;
    let days = list(conn)?;
    let (gone, kept): (Vec<i32>, Vec<i32>) = days.into_iter().partition(|d| *d < first_kept);
    if gone.is_empty() {
        return Ok(removed);
    }
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
    // The views first, so that no statement of this transaction sees them name a table
    // that is gone (DuckDB binds views when queried, and would let the drop through).
    set_list(conn, &kept)?;
    for d in &gone {
        conn.execute_batch(&format!(
            "DROP TABLE {}; DROP TABLE {}; DROP TABLE {};",
            sealed_table(Layout::Daily, *d),
            dst_table(Layout::Daily, *d),
            ends_table(*d)
        ))
        .map_err(db_err(format!("dropping the tables of day {}", date(*d))))?;
    }
    Ok(removed)
}

/// Removes the legacy slices of the hours before `hour`: the tables themselves once they
/// hold none after it (no row rewritten), else those rows. Returns the slices removed.
fn drop_legacy_before(conn: &Connection, hour: i32) -> Result<usize, StoreError> {
    let Some(until) = legacy_until(conn)? else {
        return Ok(0);
    };
    if until >= hour {
        let n = conn
            .execute(
                &format!("DELETE FROM {LEGACY_SEALED} WHERE hour < ?"),
                [hour],
            )
            .map_err(db_err("removing old legacy slices"))?;
        conn.execute(&format!("DELETE FROM {LEGACY_DST} WHERE hour < ?"), [hour])
            .map_err(db_err("removing old legacy destinations"))?;
        return Ok(n);
    }
    let n: i64 = conn
        .query_row(&format!("SELECT count(*) FROM {LEGACY_SEALED}"), [], |r| {
            r.get(0)
        })
        .map_err(db_err("counting the legacy slices"))?;
    conn.execute_batch("UPDATE trail_state SET legacy_until = NULL")
        .map_err(db_err("recording the legacy tables' removal"))?;
    set_list(conn, &list(conn)?)?;
    conn.execute_batch(&format!(
        "DROP TABLE {LEGACY_SEALED}; DROP TABLE {LEGACY_DST};"
    ))
    .map_err(db_err("dropping the legacy tables"))?;
    Ok(n as usize)
}

/// Part of migration 13, inside its transaction: the empty pair the views start from, and
/// the views over the legacy tables (dropped at once when the trail had sealed nothing).
pub fn keep_legacy(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(&format!(
        "CREATE TABLE flow_sealed_empty {SEALED_COLUMNS};
         CREATE TABLE trail_dst_empty {DST_COLUMNS};"
    ))
    .map_err(db_err("creating the empty day tables"))?;
    let until = legacy_until(conn)?;
    if until.is_none() {
        conn.execute_batch(&format!(
            "DROP TABLE {LEGACY_SEALED}; DROP TABLE {LEGACY_DST};"
        ))
        .map_err(db_err("dropping the empty legacy tables"))?;
    }
    set_list(conn, &[])?;
    if let Some(hour) = until {
        info!(
            up_to_hour = hour,
            "migration 13: the sealed hours stay in their table, read beside the new daily tables"
        );
    }
    Ok(())
}

/// Part of migration 14, inside its transaction: each day's (empty) ends table. The hours
/// sealed before have none: lookups search the hours after an interim slice of theirs, as
/// before.
pub fn add_ends(conn: &Connection) -> Result<(), StoreError> {
    for d in list(conn)? {
        conn.execute_batch(&format!("CREATE TABLE {} {ENDS_COLUMNS};", ends_table(d)))
            .map_err(db_err(format!(
                "creating the ends table of day {}",
                date(d)
            )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn a_schema_12_trail_is_kept_beside_the_days_until_retention_removes_it() {
        use crate::query::coverage::Coverage;
        use crate::store::trail;
        let dir = std::env::temp_dir().join(format!("nattrail-legacy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        // Three sealed hours across a midnight (days 19,675 and 19,676), 300 slices each.
        {
            let c = crate::store::schema::database_at_version(&path, 12);
            c.execute_batch(
                "INSERT INTO flow_sealed
                 SELECT 472_222 + i // 300, 1, 6, 0, i % 1000, NULL, (i % 65536)::USMALLINT, 1,
                        NULL, 7, i % 5, NULL, NULL, NULL, 1700000000000 + i,
                        1700000000001 + i, NULL, 1, 2, 3, 4
                 FROM range(900) t(i);
                 INSERT INTO trail_dst SELECT 472_222 + h, i, i, NULL, 443
                 FROM range(3) a(h), range(5) b(i);
                 UPDATE trail_state SET sealed_hour = 472_224;",
            )
            .unwrap();
        }
        let db = Database::open_rw(&path).unwrap();
        let c = db.connect().unwrap();
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM flow_trail", [], |r| r.get(0))
                .unwrap()
        };
        let tables = |c: &Connection| -> Vec<String> {
            c.prepare(
                "SELECT table_name FROM duckdb_tables()
                 WHERE table_name LIKE 'flow_sealed%' OR table_name LIKE 'trail_dst%'
                 ORDER BY 1",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let parts = |c: &Connection, first: i32, last: i32| -> Vec<(String, i32, i32)> {
            Coverage::read(c)
                .unwrap()
                .partitions(first, last)
                .into_iter()
                .map(|p| (p.sealed, p.first, p.last))
                .collect()
        };
        // Migrated in place: no copy, the views read the old pair.
        assert_eq!(
            (list(&c).unwrap(), legacy_until(&c).unwrap()),
            (vec![], Some(472_224))
        );
        assert_eq!(count(&c), 900);
        assert_eq!(
            parts(&c, 472_222, 472_224),
            [(LEGACY_SEALED.to_string(), 472_222, 472_224)]
        );
        // An hour sealed since goes to its day's tables; a window over both reads both.
        c.execute_batch(
            "INSERT INTO trail_recent VALUES (472_230, 1, 6, 0, 5, NULL, 80, 1, NULL, 7, 9, NULL,
                 443, NULL, NULL, NULL, 1700028000000, 1700028000001, NULL, 1, 2, 3, 4, 1, 1)",
        )
        .unwrap();
        assert_eq!(trail::seal(&c, 472_230).unwrap(), 1);
        assert_eq!(list(&c).unwrap(), [19_676]);
        assert_eq!(count(&c), 901);
        assert_eq!(
            parts(&c, 472_224, 472_230),
            [
                (LEGACY_SEALED.to_string(), 472_224, 472_224),
                ("flow_sealed_20231115".to_string(), 472_224, 472_230)
            ]
        );
        // Retention from the 15th: the legacy hours of the 14th go, the table stays.
        assert_eq!(trail::retain(&c, 472_224).unwrap(), 600);
        assert_eq!(count(&c), 301);
        assert_eq!(legacy_until(&c).unwrap(), Some(472_224));
        // From the 16th: the legacy pair and the 15th's tables are dropped whole.
        assert_eq!(trail::retain(&c, 472_248).unwrap(), 301);
        assert_eq!(
            (list(&c).unwrap(), legacy_until(&c).unwrap()),
            (vec![], None)
        );
        assert_eq!(count(&c), 0);
        assert_eq!(tables(&c), ["flow_sealed_empty", "trail_dst_empty"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_schema_13_trail_gets_an_ends_table_per_day() {
        let dir = std::env::temp_dir().join(format!("nattrail-ends13-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        // Two days of schema 13, their tables as it made them (no ends table), sealed up to
        // hour 472,230.
        {
            let c = crate::store::schema::database_at_version(&path, 13);
            keep_legacy(&c).unwrap();
            c.execute_batch(
                "CREATE TABLE flow_sealed_20231114 AS FROM flow_sealed_empty;
                 CREATE TABLE trail_dst_20231114 AS FROM trail_dst_empty;
                 CREATE TABLE flow_sealed_20231115 AS FROM flow_sealed_empty;
                 CREATE TABLE trail_dst_20231115 AS FROM trail_dst_empty;
                 UPDATE trail_state SET days = [19675, 19676], sealed_hour = 472_230;",
            )
            .unwrap();
        }
        let db = Database::open_rw(&path).unwrap();
        let c = db.connect().unwrap();
        let ends: Vec<String> = c
            .prepare(
                "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'flow_ends%'
                 ORDER BY 1",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ends, ["flow_ends_20231114", "flow_ends_20231115"]);
        let from: Option<i32> = c
            .query_row("SELECT ends_from FROM trail_state", [], |r| r.get(0))
            .unwrap();
        assert_eq!(from, Some(472_231));
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
