//! Arbitrary read-only SQL, with results as JSON values.

use duckdb::Connection;
use duckdb::types::{TimeUnit, Value};
use serde::Serialize;

use super::QueryError;
use super::who::rfc3339_us;

/// A result set.
#[derive(Debug, Clone, Serialize)]
pub struct SqlResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, as JSON values.
    pub rows: Vec<Vec<serde_json::Value>>,
    /// More rows existed than `max_rows`.
    pub truncated: bool,
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

/// Runs `sql` and returns at most `max_rows` rows.
pub fn run_sql(conn: &Connection, sql: &str, max_rows: usize) -> Result<SqlResult, QueryError> {
    let mut stmt = conn.prepare(sql).map_err(QueryError::db("preparing SQL"))?;
    let mut rows = stmt.query([]).map_err(QueryError::db("running SQL"))?;
    let (columns, ncols) = match rows.as_ref() {
        Some(s) => (s.column_names(), s.column_count()),
        None => (Vec::new(), 0),
    };
    let mut out = Vec::new();
    let mut truncated = false;
    while let Some(row) = rows.next().map_err(QueryError::db("reading SQL rows"))? {
        if out.len() >= max_rows {
            truncated = true;
            break;
        }
        let mut vals = Vec::with_capacity(ncols);
        for i in 0..ncols {
            let v: Value = row.get(i).map_err(QueryError::db("reading a SQL value"))?;
            vals.push(to_json(v));
        }
        out.push(vals);
    }
    Ok(SqlResult {
        columns,
        rows: out,
        truncated,
    })
}
