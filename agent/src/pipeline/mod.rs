//! What joins the stages of the data flow: the messages that cross a stage boundary (flow
//! events, writer messages, log positions), the clock, bounded channels, throttling and loss
//! accounting. It imports no stage: sources and sinks both import it.

pub mod cgroups;
pub mod clock;
pub mod flow;
pub mod messages;
pub mod metrics;
pub mod process;
pub mod ratelimit;
pub mod registry;
pub mod service;
pub mod stage;
