//! Triggers: events from the bus matched against operators' filters and delivered as signed
//! webhooks, guarded against SSRF.

pub mod delivery;
pub mod dispatcher;
pub mod filter;
pub mod signature;
pub mod ssrf;
pub mod trigger_store;
