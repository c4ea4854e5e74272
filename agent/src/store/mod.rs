//! The DuckDB trail: schema, migrations and the one writer.

pub mod schema;
pub mod writer;
