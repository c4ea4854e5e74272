//! The DuckDB trail: schema, migrations, the raw database handle and the one writer.

pub mod bus;
pub mod chunk_appender;
pub mod columns;
pub mod cursors;
pub mod database;
pub mod days;
pub mod event_log;
pub mod files;
pub mod gaps;
pub mod open_flows;
mod open_table;
pub mod owners;
pub mod patch;
pub mod processes;
pub mod reconcile;
pub mod schema;
pub mod secrets;
pub mod sessions;
pub mod sockets;
pub mod timestamp;
pub mod trail;
pub mod writer;
