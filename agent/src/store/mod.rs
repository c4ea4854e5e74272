//! The DuckDB trail: schema, migrations, the raw database handle and the one writer.

pub mod bus;
pub mod chunk_appender;
pub mod cursors;
pub mod database;
pub mod files;
pub mod gaps;
pub mod patch;
pub mod schema;
pub mod secrets;
pub mod writer;
