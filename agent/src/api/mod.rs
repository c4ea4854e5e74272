//! The admin HTTP API: queries, stats and metrics of the running agent, behind a bearer
//! token. DuckDB lets one process open the file read-write, and the agent is it; everything
//! else (the CLI, scripts, a fleet controller) comes through here.

pub mod auth;
pub mod error;
pub mod routes;
pub mod rules;
pub mod server;
#[cfg(test)]
pub mod test_support;
pub mod token;
pub mod triggers;
