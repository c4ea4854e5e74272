//! The decoded form of one conntrack message: what the rest of the agent stores and queries.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 and IPv6 in one comparable 128-bit form (IPv4 as `::ffff:a.b.c.d`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr(pub u128);

impl Addr {
    const V4_MAPPED_PREFIX: u128 = 0xffff_0000_0000;

    /// Builds the mapped form of an IPv4 address.
    pub fn from_v4(octets: [u8; 4]) -> Self {
        Addr(Self::V4_MAPPED_PREFIX | u128::from(u32::from_be_bytes(octets)))
    }

    /// Builds the form of an IPv6 address; IPv4-mapped addresses stay mapped.
    pub fn from_v6(octets: [u8; 16]) -> Self {
        Addr(u128::from_be_bytes(octets))
    }

    /// Whether this is an IPv4 address in mapped form.
    pub fn is_v4(self) -> bool {
        self.0 >> 32 == 0xffff
    }

    /// Back to a standard address, IPv4 for the mapped range.
    pub fn to_ip(self) -> IpAddr {
        if self.is_v4() {
            IpAddr::V4(Ipv4Addr::from(self.0 as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.0))
        }
    }
}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Addr::from_v4(v4.octets()),
                None => Addr::from_v6(v6.octets()),
            },
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_ip().fmt(f)
    }
}

/// What the kernel told us happened to the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// A new flow (NLM_F_CREATE set).
    New = 1,
    /// The flow is gone.
    Destroy = 2,
    /// Found alive by a table dump (agent start or resync).
    Dump = 3,
    /// A state change of a known flow (not stored; decoded for completeness).
    Update = 4,
}

impl EventKind {
    /// Short lower-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::New => "new",
            EventKind::Destroy => "destroy",
            EventKind::Dump => "dump",
            EventKind::Update => "update",
        }
    }

    /// Inverse of the `u8` representation stored in the database.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => EventKind::New,
            2 => EventKind::Destroy,
            3 => EventKind::Dump,
            4 => EventKind::Update,
            _ => return None,
        })
    }
}

/// Where an event's time came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TimeSource {
    /// The kernel's conntrack timestamp extension (exact).
    Kernel = 0,
    /// Our clock when the message was received (late by the queueing delay).
    Receive = 1,
}

impl TimeSource {
    /// Short lower-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            TimeSource::Kernel => "kernel",
            TimeSource::Receive => "receive",
        }
    }
}

/// The name operators use for a protocol number ("tcp", "udp", ...; the number otherwise).
pub fn proto_name(num: u8) -> String {
    match num {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        33 => "dccp".into(),
        47 => "gre".into(),
        n => n.to_string(),
    }
}

/// One direction of a flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// Source address.
    pub src: Addr,
    /// Destination address.
    pub dst: Addr,
    /// Source port, or the ICMP id.
    pub sport: u16,
    /// Destination port; for ICMP the id again, so the reply side carries the public id.
    pub dport: u16,
}

/// Packet and byte counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen (IP layer).
    pub bytes: u64,
}

/// One decoded conntrack event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// NEW, DESTROY, UPDATE or found by dump.
    pub kind: EventKind,
    /// Address family: 4 or 6.
    pub family: u8,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub proto: u8,
    /// Original direction (the client's view).
    pub orig: Tuple,
    /// Reply direction (what the server answers to: the public side after SNAT).
    pub reply: Tuple,
    /// CTA_ID: the kernel's id of the conntrack entry.
    pub ct_id: u32,
    /// CTA_ZONE.
    pub zone: u16,
    /// CTA_MARK.
    pub mark: u32,
    /// CTA_STATUS bits (IPS_*).
    pub status: u32,
    /// TCP state (CTA_PROTOINFO_TCP_STATE) when sent.
    pub tcp_state: Option<u8>,
    /// ICMP type and code when the protocol is ICMP or ICMPv6.
    pub icmp: Option<(u8, u8)>,
    /// CTA_COUNTERS_ORIG.
    pub counters_orig: Option<Counters>,
    /// CTA_COUNTERS_REPLY.
    pub counters_reply: Option<Counters>,
    /// CTA_TIMESTAMP start, ns since the Unix epoch.
    pub start_ns: Option<u64>,
    /// CTA_TIMESTAMP stop, ns since the Unix epoch.
    pub stop_ns: Option<u64>,
    /// CTA_TIMESTAMP_EVENT, ns since the Unix epoch.
    pub event_ns: Option<u64>,
}

/// IPS_SRC_NAT: the kernel applied source NAT to this flow.
pub const IPS_SRC_NAT: u32 = 1 << 4;
/// IPS_DST_NAT: the kernel applied destination NAT to this flow.
pub const IPS_DST_NAT: u32 = 1 << 5;

impl FlowEvent {
    /// Whether the flow was source-NATed (decided by IPS_SRC_NAT, never by SRC_NAT_DONE).
    pub fn is_src_nat(&self) -> bool {
        self.status & IPS_SRC_NAT != 0
    }

    /// The event's time and where it came from, given the receive clock's reading.
    pub fn event_time(&self, received_ns: u64) -> (u64, TimeSource) {
        let kernel = match self.kind {
            EventKind::Destroy => self.stop_ns.or(self.event_ns),
            EventKind::Dump => self.start_ns,
            EventKind::New | EventKind::Update => self.event_ns.or(self.start_ns),
        };
        match kernel {
            Some(ns) if ns > 0 => (ns, TimeSource::Kernel),
            _ => (received_ns, TimeSource::Receive),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_round_trips_and_orders() {
        let a: Addr = "10.77.0.5".parse::<IpAddr>().unwrap().into();
        assert!(a.is_v4());
        assert_eq!(a.to_string(), "10.77.0.5");
        let mapped: Addr = "::ffff:10.77.0.5".parse::<IpAddr>().unwrap().into();
        assert_eq!(a, mapped);
        let v6: Addr = "fd00:77::5".parse::<IpAddr>().unwrap().into();
        assert!(!v6.is_v4());
        assert_eq!(v6.to_string(), "fd00:77::5");
        let b: Addr = "10.77.0.6".parse::<IpAddr>().unwrap().into();
        assert!(a < b);
    }
}
