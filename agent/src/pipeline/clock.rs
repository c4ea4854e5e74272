//! The agent's one clock and its rendering, shared by every stage.

use chrono::{DateTime, SecondsFormat};

/// The receive clock: ns since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Renders microseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339_us(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| us.to_string())
}
