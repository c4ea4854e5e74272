//! Arbitrary read-only SQL, with results as JSON values.

use duckdb::Connection;
use duckdb::types::{TimeUnit, Value};
use serde::{Deserialize, Serialize};

use super::QueryError;
use super::who::rfc3339_us;

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

/// Runs one read-only query and returns its rows; more than `max_rows` rows is an error
/// (a silent cut would pass for a complete answer), and so is running past `timeout`.
///
/// Read-only by construction: the text is run as a subquery, where only SELECT-like
/// statements parse, so INSERT, UPDATE, CREATE, ATTACH, COPY, SET, PRAGMA or a second
/// statement are refused even on a read-write connection (the agent's).
pub fn run_sql(
    conn: &Connection,
    sql: &str,
    max_rows: usize,
    timeout: std::time::Duration,
) -> Result<SqlResult, QueryError> {
    let text = sql.trim().trim_end_matches(';').trim_end();
    let first = text
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    if !matches!(
        first.as_str(),
        "SELECT" | "WITH" | "FROM" | "VALUES" | "TABLE" | ""
    ) {
        return Err(QueryError::ReadOnly(first));
    }
    if text.is_empty() {
        return Err(QueryError::Invalid("empty SQL".into()));
    }
    let wrapped = format!("SELECT * FROM (\n{text}\n) AS q LIMIT {}", max_rows + 1);
    let mut stmt = conn.prepare(&wrapped).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("syntax error") || msg.contains("Parser Error") {
            QueryError::Invalid(format!(
                "not a single read-only query (one SELECT or WITH ... SELECT): {msg}"
            ))
        } else {
            QueryError::Db {
                context: "preparing SQL",
                source: e,
            }
        }
    })?;
    // Interrupt from a timer thread; the flag tells a late timer the query already ended.
    let interrupt = conn.interrupt_handle();
    let done = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let timer = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let (lock, cv) = &*done;
            let guard = lock.lock().expect("sql timer lock");
            let (guard, res) = cv
                .wait_timeout_while(guard, timeout, |finished| !*finished)
                .expect("sql timer lock");
            if res.timed_out() && !*guard {
                interrupt.interrupt();
                return true;
            }
            false
        })
    };
    let result = (|| {
        let mut rows = stmt.query([]).map_err(QueryError::db("running SQL"))?;
        let (columns, ncols) = match rows.as_ref() {
            Some(s) => (s.column_names(), s.column_count()),
            None => (Vec::new(), 0),
        };
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(QueryError::db("reading SQL rows"))? {
            if out.len() >= max_rows {
                return Err(QueryError::RowLimit(max_rows));
            }
            let mut vals = Vec::with_capacity(ncols);
            for i in 0..ncols {
                let v: Value = row.get(i).map_err(QueryError::db("reading a SQL value"))?;
                vals.push(to_json(v));
            }
            out.push(vals);
        }
        Ok(SqlResult { columns, rows: out })
    })();
    {
        let (lock, cv) = &*done;
        *lock.lock().expect("sql timer lock") = true;
        cv.notify_all();
    }
    let timed_out = timer.join().unwrap_or(false);
    match result {
        Err(_) if timed_out => Err(QueryError::Timeout(timeout)),
        other => other,
    }
}
