//! Arbitrary read-only SQL, with results as JSON values.

use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use duckdb::types::{TimeUnit, Value};
use duckdb::{Connection, ffi};
use serde::{Deserialize, Serialize};

use super::QueryError;
use crate::pipeline::clock::rfc3339_us;
use crate::store::database::{Database, RawConnection};

/// A result set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SqlResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, as JSON values.
    pub rows: Vec<Vec<serde_json::Value>>,
}

fn us_of(unit: TimeUnit, v: i64) -> i64 {
    match unit {
        TimeUnit::Second => v.saturating_mul(1_000_000),
        TimeUnit::Millisecond => v.saturating_mul(1_000),
        TimeUnit::Microsecond => v,
        TimeUnit::Nanosecond => v / 1_000,
    }
}

/// Converts a DuckDB value to JSON (timestamps as RFC 3339 UTC, 128-bit integers as strings).
pub fn to_json(v: Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Boolean(b) => J::Bool(b),
        Value::TinyInt(i) => J::from(i),
        Value::SmallInt(i) => J::from(i),
        Value::Int(i) => J::from(i),
        Value::BigInt(i) => J::from(i),
        Value::UTinyInt(i) => J::from(i),
        Value::USmallInt(i) => J::from(i),
        Value::UInt(i) => J::from(i),
        Value::UBigInt(i) => J::from(i),
        Value::HugeInt(i) => J::String(i.to_string()),
        Value::UHugeInt(i) => J::String(i.to_string()),
        Value::Float(f) => J::from(f64::from(f)),
        Value::Double(f) => J::from(f),
        Value::Text(s) => J::String(s),
        Value::Timestamp(unit, v) => J::String(rfc3339_us(us_of(unit, v))),
        Value::Date32(days) => chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163)
            .map(|d| J::String(d.to_string()))
            .unwrap_or(J::from(days)),
        Value::List(items) | Value::Array(items) => {
            J::Array(items.into_iter().map(to_json).collect())
        }
        Value::Enum(s) => J::String(s),
        other => J::String(format!("{other:?}")),
    }
}

/// The bounds of one `/sql` query.
#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    /// More rows than this is an error.
    pub max_rows: usize,
    /// A result whose JSON is larger than this is an error.
    pub max_bytes: usize,
    /// Preparation and execution together are interrupted after this long.
    pub timeout: Duration,
}

/// DuckDB's name of a statement type, for the refusal's message.
fn statement_type_name(t: ffi::duckdb_statement_type) -> &'static str {
    match t {
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_SELECT => "SELECT",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_INSERT => "INSERT",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_UPDATE => "UPDATE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_EXPLAIN => "EXPLAIN",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_DELETE => "DELETE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_PREPARE => "PREPARE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_CREATE => "CREATE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_EXECUTE => "EXECUTE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_ALTER => "ALTER",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_TRANSACTION => "TRANSACTION",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_COPY => "COPY",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_ANALYZE => "ANALYZE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_VARIABLE_SET => "SET VARIABLE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_CREATE_FUNC => "CREATE FUNCTION",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_DROP => "DROP",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_EXPORT => "EXPORT",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_PRAGMA => "PRAGMA",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_VACUUM => "VACUUM",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_CALL => "CALL",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_SET => "SET",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_LOAD => "LOAD",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_RELATION => "RELATION",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_EXTENSION => "EXTENSION",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_LOGICAL_PLAN => "LOGICAL PLAN",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_ATTACH => "ATTACH",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_DETACH => "DETACH",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_MULTI => "MULTI",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_COPY_DATABASE => "COPY DATABASE",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_UPDATE_EXTENSIONS => "UPDATE EXTENSIONS",
        ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_MERGE_INTO => "MERGE INTO",
        _ => "an unknown statement type",
    }
}

/// DuckDB's message behind a C string it owns (or a fallback when there is none).
fn message(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return "no message from DuckDB".into();
    }
    // SAFETY: a NUL-terminated string owned by the object it came from, read at once.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

struct Extracted(ffi::duckdb_extracted_statements);

impl Drop for Extracted {
    fn drop(&mut self) {
        // SAFETY: filled by duckdb_extract_statements (even on failure), destroyed once.
        unsafe { ffi::duckdb_destroy_extracted(&mut self.0) };
    }
}

struct Prepared(ffi::duckdb_prepared_statement);

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: filled by duckdb_prepare_extracted_statement (even on failure), once.
        unsafe { ffi::duckdb_destroy_prepare(&mut self.0) };
    }
}

/// Runs SQL of our own on the C API connection.
fn raw_exec(raw: &RawConnection, sql: &CStr) -> Result<(), QueryError> {
    raw.execute(sql)
        .map_err(|e| QueryError::Refused(format!("{}: {e}", sql.to_string_lossy())))
}

/// Whether DuckDB's parser sees `text` (one statement, parsed already) as a SELECT
/// statement: `json_serialize_sql` serialises SELECT statements only, without binding.
fn parses_as_select(conn: &Connection, text: &str) -> Result<bool, QueryError> {
    conn.query_row(
        "SELECT NOT CAST(json_serialize_sql(?) ->> 'error' AS BOOLEAN)",
        [text],
        |r| r.get(0),
    )
    .map_err(QueryError::db(
        "asking DuckDB's parser for the statement's kind",
    ))
}

/// Decides with DuckDB's own parser and binder that `text` is exactly one query: the
/// statements are extracted by the parser, and the one statement is prepared (in a
/// read-only transaction, so that nothing a binder might do can write) and its type read
/// from the prepared statement. A statement the binder refuses (COPY to a file, with file
/// access off) is told apart by the parser alone. Never a look at the text itself.
fn classify(raw: &RawConnection, conn: &Connection, text: &str) -> Result<(), QueryError> {
    let c = CString::new(text)
        .map_err(|_| QueryError::Invalid("the SQL text contains a NUL byte".into()))?;
    let mut ex = Extracted(ptr::null_mut());
    // SAFETY: a live connection, a C string and an out-pointer to a local.
    let n = unsafe { ffi::duckdb_extract_statements(raw.handle(), c.as_ptr(), &mut ex.0) };
    if n == 0 {
        // SAFETY: the extracted statements carry the parser's error, if any.
        let err = unsafe { ffi::duckdb_extract_statements_error(ex.0) };
        return Err(QueryError::Invalid(if err.is_null() {
            "empty SQL: no statement".into()
        } else {
            message(err)
        }));
    }
    if n > 1 {
        return Err(QueryError::ReadOnly(format!(
            "{n} statements (exactly one query is allowed)"
        )));
    }
    raw_exec(raw, c"BEGIN TRANSACTION READ ONLY")?;
    let out = (|| {
        let mut p = Prepared(ptr::null_mut());
        // SAFETY: index 0 of one extracted statement; out-pointer to a local.
        let rc =
            unsafe { ffi::duckdb_prepare_extracted_statement(raw.handle(), ex.0, 0, &mut p.0) };
        if rc != ffi::DuckDBSuccess {
            // SAFETY: a failed prepared statement carries its error until destroyed.
            let why = message(unsafe { ffi::duckdb_prepare_error(p.0) });
            return Err(if parses_as_select(conn, text)? {
                QueryError::Refused(why)
            } else {
                QueryError::ReadOnly(format!("a statement that is not a query ({why})"))
            });
        }
        // SAFETY: a successfully prepared statement.
        let t = unsafe { ffi::duckdb_prepared_statement_type(p.0) };
        if t != ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_SELECT {
            return Err(QueryError::ReadOnly(statement_type_name(t).to_string()));
        }
        Ok(())
    })();
    raw_exec(raw, c"ROLLBACK")?;
    out
}

/// Counts the bytes serde_json would write, without keeping them.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one read-only query and returns its rows. Exactly one statement is accepted, and it
/// must be a query by DuckDB's own classification; the database is opened with external
/// access, extension loading and configuration changes off, and the query runs in a
/// read-only transaction that is rolled back. More than `max_rows` rows or `max_bytes` of
/// JSON is an error (a silent cut would pass for a complete answer), and so is running past
/// `timeout`, which covers preparation as well as execution.
pub fn run_sql(db: &Database, sql: &str, limits: &SqlLimits) -> Result<SqlResult, QueryError> {
    let conn = db
        .connect()
        .map_err(|e| QueryError::Unavailable(e.to_string()))?;
    let raw = Arc::new(
        db.raw_connection()
            .map_err(|e| QueryError::Unavailable(e.to_string()))?,
    );
    // Interrupt from a timer thread; the flag tells a late timer the query already ended.
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let timer = {
        let done = Arc::clone(&done);
        let (rs, raw) = (conn.interrupt_handle(), Arc::clone(&raw));
        let timeout = limits.timeout;
        std::thread::spawn(move || {
            let (lock, cv) = &*done;
            let guard = lock.lock().expect("sql timer lock");
            let (guard, res) = cv
                .wait_timeout_while(guard, timeout, |finished| !*finished)
                .expect("sql timer lock");
            if res.timed_out() && !*guard {
                raw.interrupt();
                rs.interrupt();
                return true;
            }
            false
        })
    };
    let result = classify(&raw, &conn, sql).and_then(|()| {
        conn.execute_batch("BEGIN TRANSACTION READ ONLY")
            .map_err(QueryError::db("starting a read-only transaction"))?;
        let out = collect(&conn, sql, limits);
        let _ = conn.execute_batch("ROLLBACK");
        out
    });
    {
        let (lock, cv) = &*done;
        *lock.lock().expect("sql timer lock") = true;
        cv.notify_all();
    }
    let timed_out = timer.join().unwrap_or(false);
    match result {
        Err(_) if timed_out => Err(QueryError::Timeout(limits.timeout)),
        other => other,
    }
}

/// Prepares the one statement `classify` accepted and reads its rows within the limits.
fn collect(conn: &Connection, sql: &str, limits: &SqlLimits) -> Result<SqlResult, QueryError> {
    let refused = |e: duckdb::Error| QueryError::Refused(e.to_string());
    // One statement (checked): duckdb-rs runs nothing before it.
    let mut stmt = conn.prepare(sql).map_err(refused)?;
    let mut rows = stmt.query([]).map_err(refused)?;
    let (columns, ncols) = match rows.as_ref() {
        Some(s) => (s.column_names(), s.column_count()),
        None => (Vec::new(), 0),
    };
    let mut bytes = ByteCount(0);
    serde_json::to_writer(&mut bytes, &columns).expect("counting never fails");
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(refused)? {
        if out.len() >= limits.max_rows {
            return Err(QueryError::RowLimit(limits.max_rows));
        }
        let mut vals = Vec::with_capacity(ncols);
        for i in 0..ncols {
            let v: Value = row.get(i).map_err(refused)?;
            let v = to_json(v);
            serde_json::to_writer(&mut bytes, &v).expect("counting never fails");
            vals.push(v);
        }
        // Commas and brackets: a row costs at least its values plus one per value.
        bytes.0 += ncols + 2;
        if bytes.0 > limits.max_bytes {
            return Err(QueryError::TooLarge(limits.max_bytes));
        }
        out.push(vals);
    }
    Ok(SqlResult { columns, rows: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(tag: &str) -> (std::path::PathBuf, Database) {
        let dir = std::env::temp_dir().join(format!("nattrail-sql-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        (dir, db)
    }

    const LIMITS: SqlLimits = SqlLimits {
        max_rows: 100,
        max_bytes: 1 << 20,
        timeout: Duration::from_secs(10),
    };

    #[test]
    fn only_one_query_by_duckdbs_own_classification() {
        let (dir, db) = db("classify");
        let ok = |sql: &str| run_sql(&db, sql, &LIMITS).unwrap().rows;
        assert_eq!(ok("SELECT 1 AS a"), vec![vec![serde_json::json!(1)]]);
        assert_eq!(
            ok("FROM (VALUES (2)) t(x) SELECT x"),
            vec![vec![serde_json::json!(2)]]
        );
        assert_eq!(ok("  SELECT 3 ;  "), vec![vec![serde_json::json!(3)]]);
        assert_eq!(
            ok("PIVOT (SELECT 'a' AS k, 1 AS v) ON k IN ('a') USING first(v)"),
            vec![vec![serde_json::json!(1)]]
        );
        for (sql, word) in [
            ("SELECT 1; SELECT 2", "2 statements"),
            (
                "SELECT 1; DROP TABLE conntrack_events; SELECT 2",
                "3 statements",
            ),
            ("CREATE TABLE x (a INT)", "CREATE"),
            (
                "INSERT INTO capture_gaps SELECT * FROM capture_gaps",
                "INSERT",
            ),
            (
                "COPY conntrack_events TO '/tmp/nattrail-never.csv'",
                "not a query",
            ),
            ("EXPORT DATABASE '/tmp/nattrail-never'", "not a query"),
            ("ATTACH '/tmp/nattrail-never.db'", "ATTACH"),
            ("SET threads = 1", "SET"),
            ("CHECKPOINT", "CALL"),
            ("PRAGMA enable_profiling = 'json'", "SET"),
            // A dynamic PIVOT creates an enum type first: several statements in one.
            (
                "PIVOT (SELECT 'a' AS k, 1 AS v) ON k USING first(v)",
                "MULTI",
            ),
            ("INSTALL httpfs", ""),
            ("EXPLAIN SELECT 1", "EXPLAIN"),
        ] {
            match run_sql(&db, sql, &LIMITS) {
                Err(QueryError::ReadOnly(what)) => assert!(what.contains(word), "{sql}: {what}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
        for sql in [
            "SELECT * FROM read_text('/etc/hostname')",
            "SELECT * FROM glob('/*')",
            "SELECT nextval('event_trigger_ids')",
        ] {
            assert!(
                matches!(run_sql(&db, sql, &LIMITS), Err(QueryError::Refused(_))),
                "{sql}"
            );
        }
        assert!(matches!(
            run_sql(&db, "", &LIMITS),
            Err(QueryError::Invalid(_))
        ));
        // The old subquery escape no longer parses: nothing of it runs.
        assert!(matches!(
            run_sql(
                &db,
                "SELECT 1) q; DROP TABLE conntrack_events; SELECT (1",
                &LIMITS
            ),
            Err(QueryError::Invalid(_))
        ));
        assert!(!std::path::Path::new("/tmp/nattrail-never.csv").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_bytes_and_time_are_capped_never_cut() {
        let (dir, db) = db("caps");
        let small = SqlLimits {
            max_rows: 10,
            max_bytes: 1000,
            timeout: Duration::from_millis(200),
        };
        assert!(run_sql(&db, "SELECT * FROM range(10)", &small).is_ok());
        assert!(matches!(
            run_sql(&db, "SELECT * FROM range(11)", &small),
            Err(QueryError::RowLimit(10))
        ));
        assert!(matches!(
            run_sql(&db, "SELECT repeat('x', 400) FROM range(3)", &small),
            Err(QueryError::TooLarge(1000))
        ));
        let started = std::time::Instant::now();
        assert!(matches!(
            run_sql(
                &db,
                "SELECT count(*) FROM range(1000000000000::BIGINT)",
                &small
            ),
            Err(QueryError::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
