//! Protocol names as operators type them.

use std::str::FromStr;

/// A protocol filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP and ICMPv6 (1, 58).
    Icmp,
}

impl Proto {
    /// The protocol numbers this filter matches.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Proto::Tcp => &[6],
            Proto::Udp => &[17],
            Proto::Icmp => &[1, 58],
        }
    }
}

impl FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Ok(Proto::Tcp),
            "udp" | "17" => Ok(Proto::Udp),
            "icmp" | "icmpv6" | "1" | "58" => Ok(Proto::Icmp),
            other => Err(format!("unknown protocol {other:?}: use tcp, udp or icmp")),
        }
    }
}
