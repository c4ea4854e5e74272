//! nattrail: a searchable trail of NAT translations for Linux gateways and Docker hosts.

pub mod api;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod docker;
pub mod ebpf;
pub mod pipeline;
pub mod query;
pub mod scan;
pub mod status;
pub mod store;
pub mod triggers;
