//! What a trigger matches: AND-composed filters over an event's severity, source, message
//! and, for connection events, its destination, destination port, internal address and
//! protocol. An empty filter list places no condition.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::scan::engine::compile;
use crate::scan::rules::Severity;
use crate::store::bus::StoredEvent;

/// A trigger's conditions, as stored and sent over the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Any of these severities.
    #[serde(default)]
    pub severities: Vec<Severity>,
    /// Any of these sources: logscan, conntrack, agent.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The message matches this regex.
    #[serde(default)]
    pub message: Option<String>,
    /// Connection events: the destination is in one of these networks.
    #[serde(default)]
    pub dst: Vec<IpNet>,
    /// Connection events: the destination port is one of these.
    #[serde(default)]
    pub dst_ports: Vec<u16>,
    /// Connection events: the internal (pre-NAT) address is in one of these networks.
    #[serde(default)]
    pub internal: Vec<IpNet>,
    /// Connection events: tcp, udp or icmp.
    #[serde(default)]
    pub proto: Option<String>,
}

/// A filter with its regex compiled once.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    f: Filter,
    message: Option<Regex>,
}

impl Filter {
    /// Compiles the message regex; a bad one is refused with the compiler's message.
    pub fn compile(self) -> Result<CompiledFilter, String> {
        let message = self
            .message
            .as_deref()
            .map(compile)
            .transpose()
            .map_err(|e| format!("message filter does not compile: {e}"))?;
        Ok(CompiledFilter { f: self, message })
    }
}

fn meta_ip(ev: &StoredEvent, key: &str) -> Option<IpAddr> {
    ev.metadata.get(key)?.as_str()?.parse().ok()
}

impl CompiledFilter {
    /// Whether `ev` passes every condition.
    pub fn matches(&self, ev: &StoredEvent) -> bool {
        let f = &self.f;
        if !f.severities.is_empty() && !f.severities.iter().any(|s| s.as_str() == ev.severity) {
            return false;
        }
        if !f.sources.is_empty() && !f.sources.iter().any(|s| s == ev.source) {
            return false;
        }
        if let Some(re) = &self.message
            && !re.is_match(&ev.message)
        {
            return false;
        }
        let in_any = |nets: &[IpNet], key: &str| {
            nets.is_empty()
                || meta_ip(ev, key).is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
        };
        if !in_any(&f.dst, "dst_ip") || !in_any(&f.internal, "internal_ip") {
            return false;
        }
        if !f.dst_ports.is_empty() {
            let port = ev.metadata.get("dst_port").and_then(|p| p.as_u64());
            if !port.is_some_and(|p| f.dst_ports.iter().any(|w| u64::from(*w) == p)) {
                return false;
            }
        }
        if let Some(p) = &f.proto
            && ev.metadata.get("proto").and_then(|v| v.as_str()) != Some(p.as_str())
        {
            return false;
        }
        true
    }

    /// The filter as given.
    pub fn filter(&self) -> &Filter {
        &self.f
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn flow(dst: &str, port: u16, internal: &str, proto: &str) -> StoredEvent {
        StoredEvent {
            id: 1,
            ts_ns: 0,
            source: "conntrack",
            severity: "info",
            message: format!("new {proto} flow {internal} -> {dst}:{port}"),
            metadata: json!({"dst_ip": dst, "dst_port": port, "internal_ip": internal, "proto": proto}),
        }
    }

    fn hit(severity: &'static str, message: &str) -> StoredEvent {
        StoredEvent {
            id: 2,
            ts_ns: 0,
            source: "logscan",
            severity,
            message: message.into(),
            metadata: json!({"container": "web"}),
        }
    }

    #[test]
    fn each_filter_includes_and_excludes_and_they_compose_with_and() {
        let f = |f: Filter| f.compile().unwrap();
        let ev = flow("203.0.113.9", 22, "10.77.0.11", "tcp");
        let cases: Vec<(Filter, bool)> = vec![
            (Filter::default(), true),
            (
                Filter {
                    dst: vec!["203.0.113.0/24".parse().unwrap()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    dst: vec!["198.51.100.0/24".parse().unwrap()],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    dst_ports: vec![22, 23],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    dst_ports: vec![80],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    internal: vec!["10.77.0.0/24".parse().unwrap()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    internal: vec!["10.78.0.0/24".parse().unwrap()],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    proto: Some("tcp".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    proto: Some("udp".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    sources: vec!["conntrack".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    sources: vec!["logscan".into()],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    severities: vec![Severity::Info],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    severities: vec![Severity::Error],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    message: Some(r":22$".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    message: Some(r":80$".into()),
                    ..Default::default()
                },
                false,
            ),
            // AND: every condition holds, or the event is out.
            (
                Filter {
                    dst_ports: vec![22],
                    proto: Some("tcp".into()),
                    sources: vec!["conntrack".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    dst_ports: vec![22],
                    proto: Some("udp".into()),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (filter, want) in cases {
            assert_eq!(f(filter.clone()).matches(&ev), want, "{filter:?}");
        }
        // Connection filters leave out events that are not connections.
        let h = hit("error", "disk full");
        assert!(
            !f(Filter {
                dst_ports: vec![22],
                ..Default::default()
            })
            .matches(&h)
        );
        assert!(
            f(Filter {
                severities: vec![Severity::Error],
                ..Default::default()
            })
            .matches(&h)
        );
        assert!(
            Filter {
                message: Some("(".into()),
                ..Default::default()
            }
            .compile()
            .is_err()
        );
    }
}
