//! The Docker source: the multiplexed log stream and its lines.

pub mod containers;
pub mod frames;
pub mod lines;
pub mod source;
pub mod tail;
