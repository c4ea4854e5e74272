//! The forensic queries, shared by the CLI (and later the HTTP API).

pub mod coverage;
pub mod endpoint;
pub mod flows;
pub mod instant;
pub mod proto;
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
}

impl QueryError {
    /// Wraps a DuckDB error with what we were doing.
    pub fn db(context: &'static str) -> impl FnOnce(duckdb::Error) -> QueryError {
        move |source| QueryError::Db { context, source }
    }
}
