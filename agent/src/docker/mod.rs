//! The Docker source: discovery, the multiplexed log stream and its lines, and log scanning
//! as the rest of the agent sees it (rules in force and counters).

pub mod containers;
pub mod frames;
pub mod lines;
pub mod logscan;
pub mod source;
pub mod tail;
