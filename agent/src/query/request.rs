//! The query requests as the CLI and the HTTP API receive them (text, as typed), and their
//! one validation into typed queries, so both give the same answers and the same errors.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::QueryError;
use super::endpoint::parse_endpoint;
use super::events::EventsQuery;
use super::flows::FlowsQuery;
use super::instant::{Zone, parse_duration, parse_instant};
use super::proto::Proto;
use super::who::WhoQuery;

/// The most rows a listing returns in one answer.
pub const MAX_LIMIT: usize = 100_000;

fn invalid(e: impl std::fmt::Display) -> QueryError {
    QueryError::Invalid(e.to_string())
}

fn zone(tz: &Option<String>) -> Result<Option<Zone>, QueryError> {
    tz.as_deref().map(Zone::parse).transpose().map_err(invalid)
}

fn instant(
    s: &Option<String>,
    zone: Option<&Zone>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, QueryError> {
    s.as_deref()
        .map(|s| parse_instant(s, zone))
        .transpose()
        .map_err(invalid)
}

/// The `since`/`until` pair of a listing, local instants read in `tz`.
type Window = (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
);

fn window(
    since: &Option<String>,
    until: &Option<String>,
    tz: &Option<String>,
) -> Result<Window, QueryError> {
    let zone = zone(tz)?;
    Ok((
        instant(since, zone.as_ref())?,
        instant(until, zone.as_ref())?,
    ))
}

fn ip_only(s: &Option<String>, field: &str) -> Result<Option<IpAddr>, QueryError> {
    match s {
        None => Ok(None),
        Some(v) => match parse_endpoint(v).map_err(invalid)? {
            (ip, None) => Ok(Some(ip)),
            (_, Some(_)) => Err(invalid(format!(
                "{field} takes an address without port: {v:?}"
            ))),
        },
    }
}

fn endpoint(s: &Option<String>) -> Result<(Option<IpAddr>, Option<u16>), QueryError> {
    match s {
        None => Ok((None, None)),
        Some(d) => {
            let (ip, port) = parse_endpoint(d).map_err(invalid)?;
            Ok((Some(ip), port))
        }
    }
}

fn proto(s: &Option<String>) -> Result<Option<Proto>, QueryError> {
    s.as_deref()
        .map(str::parse::<Proto>)
        .transpose()
        .map_err(invalid)
}

fn limit(l: Option<usize>, default: usize) -> Result<usize, QueryError> {
    match l.unwrap_or(default) {
        0 => Err(invalid("limit must be at least 1")),
        n if n > MAX_LIMIT => Err(invalid(format!(
            "limit {n} exceeds the maximum of {MAX_LIMIT} rows"
        ))),
        n => Ok(n),
    }
}

/// `who`: which client owned public IP:port at an instant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhoRequest {
    /// Public address.
    pub ip: String,
    /// Public port (ICMP id).
    pub port: u16,
    /// RFC 3339, epoch seconds, or local `YYYY-MM-DD HH:MM:SS` in `tz`.
    pub at: String,
    /// Clock tolerance, e.g. "10s" (default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<String>,
    /// Zone of a local `at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// tcp, udp or icmp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Destination IP[:PORT].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
}

impl WhoRequest {
    /// Validates into a query; `live` when a running agent answers.
    pub fn to_query(&self, live: bool) -> Result<WhoQuery, QueryError> {
        let (ip, port_in_ip) = parse_endpoint(&self.ip).map_err(invalid)?;
        if port_in_ip.is_some() {
            return Err(invalid(
                "ip takes an address only; give the port separately",
            ));
        }
        let zone = zone(&self.tz)?;
        let at = parse_instant(&self.at, zone.as_ref()).map_err(invalid)?;
        let tolerance =
            parse_duration(self.tolerance.as_deref().unwrap_or("10s")).map_err(invalid)?;
        let (dst_ip, dst_port) = endpoint(&self.dst)?;
        Ok(WhoQuery {
            ip,
            port: self.port,
            at,
            tolerance,
            proto: proto(&self.proto)?,
            dst_ip,
            dst_port,
            live,
        })
    }
}

/// `flows`: flows by address, port, protocol and time window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsRequest {
    /// Internal client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_ip: Option<String>,
    /// Public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// Public port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    /// Any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Destination IP[:PORT].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// tcp, udp or icmp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Flows alive at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Flows started at or before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Zone of local instants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// At most this many flows (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl FlowsRequest {
    /// Validates into a query.
    pub fn to_query(&self) -> Result<FlowsQuery, QueryError> {
        let (since, until) = window(&self.since, &self.until, &self.tz)?;
        let (dst_ip, dst_port) = endpoint(&self.dst)?;
        Ok(FlowsQuery {
            internal_ip: ip_only(&self.internal_ip, "internal_ip")?,
            public_ip: ip_only(&self.public_ip, "public_ip")?,
            port: self.port,
            public_port: self.public_port,
            dst_ip,
            dst_port,
            proto: proto(&self.proto)?,
            since,
            until,
            limit: limit(self.limit, 100)?,
        })
    }
}

/// `events`: the starts and ends of flows in time order, with cursor paging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// Events at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Events at or before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Zone of local instants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// Any address of the flow (internal, public or destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Any port of the flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// new, destroy or dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// At most this many events (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Resume after this cursor (`next_cursor` of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
}

impl EventsRequest {
    /// Validates into a query.
    pub fn to_query(&self) -> Result<EventsQuery, QueryError> {
        let (since, until) = window(&self.since, &self.until, &self.tz)?;
        let kind = match self.kind.as_deref() {
            None => None,
            Some("new") => Some(1u8),
            Some("destroy") => Some(2),
            Some("dump") => Some(3),
            Some(other) => {
                return Err(invalid(format!(
                    "unknown event kind {other:?}: use new, destroy or dump"
                )));
            }
        };
        Ok(EventsQuery {
            since,
            until,
            ip: ip_only(&self.ip, "ip")?,
            port: self.port,
            kind,
            limit: limit(self.limit, 100)?,
            after_seq: self.cursor,
        })
    }
}

/// `sql`: one read-only query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// The query: one SELECT (or WITH ... SELECT).
    pub sql: String,
    /// At most this many rows; more is an error, not a silent cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Give up after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}
