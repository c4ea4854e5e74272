//! The forensic queries, shared by the CLI (and later the HTTP API).

pub mod attribution;
pub mod coverage;
pub mod endpoint;
pub mod events;
pub mod flows;
pub mod instant;
pub mod proto;
pub mod request;
pub mod sql;
pub mod who;

/// Errors of running a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// DuckDB refused or failed the query.
    #[error("{context}: {source}")]
    Db {
        /// What we were doing.
        context: &'static str,
        /// DuckDB's error.
        source: duckdb::Error,
    },
    /// The request itself is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The trail contradicts itself (a sealed slice whose destination is not in its hour's
    /// dictionary).
    #[error("the trail is inconsistent: {0}")]
    Corrupt(String),
    /// The SQL is not exactly one read-only query (DuckDB's classification).
    #[error(
        "only one read-only query is allowed (SELECT, WITH ... SELECT, FROM ..., PIVOT, DESCRIBE), not {0}"
    )]
    ReadOnly(String),
    /// DuckDB refused the SQL (a syntax or binder error, or a disabled feature).
    #[error("DuckDB refused the query: {0}")]
    Refused(String),
    /// No connection to the database could be made.
    #[error("connecting to the database: {0}")]
    Unavailable(String),
    /// The answer's JSON is larger than allowed.
    #[error("the query's result is larger than {0} bytes: select fewer columns or rows")]
    TooLarge(usize),
    /// The answer has more rows than allowed.
    #[error("the query returns more than {0} rows: add a LIMIT or narrow it")]
    RowLimit(usize),
    /// The query ran past its time limit and was interrupted.
    #[error("the query ran longer than {0:?} and was interrupted")]
    Timeout(std::time::Duration),
}

impl QueryError {
    /// Wraps a DuckDB error with what we were doing.
    pub fn db(context: &'static str) -> impl FnOnce(duckdb::Error) -> QueryError {
        move |source| QueryError::Db { context, source }
    }
}

/// Runs `f` in one read-only transaction, so that its statements read one snapshot: a seal
/// committed between two of a lookup's statements would have moved an hour's slices out of
/// the table the first statement said to search.
pub(crate) fn in_snapshot<T>(
    conn: &duckdb::Connection,
    f: impl FnOnce(&duckdb::Connection) -> Result<T, QueryError>,
) -> Result<T, QueryError> {
    conn.prepare_cached("BEGIN TRANSACTION READ ONLY")
        .and_then(|mut s| s.execute([]))
        .map_err(QueryError::db("starting a read-only transaction"))?;
    let out = f(conn);
    let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = conn
        .prepare_cached(end)
        .and_then(|mut s| s.execute([]))
        .map_err(QueryError::db("ending a read-only transaction"));
    let out = out?;
    ended?;
    Ok(out)
}
