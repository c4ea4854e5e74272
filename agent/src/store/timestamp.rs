//! TIMESTAMP columns read, and bound as parameters, as microseconds since the epoch. The
//! conversion happens here rather than in SQL: `epoch_us` and `make_timestamp` are core
//! functions, which the CLI's `who` leaves unloaded (`OpenOptions::builtin_only`).

use duckdb::types::ValueRef;
use duckdb::types::{FromSql, FromSqlError, FromSqlResult, TimeUnit, ToSql, ToSqlOutput, Value};

/// A TIMESTAMP as µs since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Micros(pub i64);

impl FromSql for Micros {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let ValueRef::Timestamp(unit, t) = value else {
            return Err(FromSqlError::InvalidType);
        };
        let us = match unit {
            TimeUnit::Second => t.checked_mul(1_000_000),
            TimeUnit::Millisecond => t.checked_mul(1_000),
            TimeUnit::Microsecond => Some(t),
            TimeUnit::Nanosecond => Some(t.div_euclid(1_000)),
        };
        us.map(Micros)
            .ok_or(FromSqlError::OutOfRange(i128::from(t)))
    }
}

impl ToSql for Micros {
    fn to_sql(&self) -> duckdb::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Owned(Value::Timestamp(
            TimeUnit::Microsecond,
            self.0,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read back as `epoch_us` gives it, and bound as `make_timestamp` makes it: TIMESTAMP
    /// (µs) and the other precisions, before and after the epoch.
    #[test]
    fn timestamps_read_and_bound_as_epoch_microseconds() {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        for us in [0_i64, 1, -1, 1_767_225_600_123_456, -86_400_000_001] {
            let (got, epoch, same): (Micros, i64, bool) = conn
                .query_row(
                    "SELECT make_timestamp(?::BIGINT), epoch_us(make_timestamp(?::BIGINT)),
                            ? = make_timestamp(?::BIGINT)",
                    duckdb::params![us, us, Micros(us), us],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert_eq!((got, epoch, same), (Micros(us), us, true));
        }
        for (sql, want) in [
            (
                "SELECT TIMESTAMP_S '2026-01-01 00:00:01'",
                1_767_225_601_000_000,
            ),
            (
                "SELECT TIMESTAMP_MS '2026-01-01 00:00:00.002'",
                1_767_225_600_002_000,
            ),
            ("SELECT TIMESTAMP_NS '1969-12-31 23:59:59.999999999'", -1),
        ] {
            let got: Micros = conn.query_row(sql, [], |r| r.get(0)).unwrap();
            assert_eq!(got, Micros(want), "{sql}");
        }
        let err = conn.query_row("SELECT 5::BIGINT", [], |r| r.get::<_, Micros>(0));
        assert!(err.is_err(), "a BIGINT is not a timestamp: {err:?}");
    }
}
