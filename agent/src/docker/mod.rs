//! The Docker source: the multiplexed log stream and its lines.

pub mod frames;
pub mod lines;
