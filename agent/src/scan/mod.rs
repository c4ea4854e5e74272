//! Log scanning: rules, their effective set per workload, and the matching engine.

pub mod admin;
pub mod engine;
pub mod literal_gate;
pub mod live;
pub mod rule_store;
pub mod rules;
pub mod worker;
