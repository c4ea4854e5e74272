//! What joins the stages of the data flow: bounded channels, throttling and loss accounting.

pub mod counters;
pub mod ratelimit;
pub mod registry;
pub mod stage;
