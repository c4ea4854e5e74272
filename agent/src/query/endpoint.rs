//! `IP`, `IP:PORT` and `[IPv6]:PORT` as typed on the command line.

use std::net::{IpAddr, SocketAddr};

/// Parses an address with an optional port.
pub fn parse_endpoint(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let t = s.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    Err(format!(
        "cannot read address {s:?}: use 198.51.100.7, 198.51.100.7:443, 2001:db8::1 or [2001:db8::1]:443"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            parse_endpoint("10.0.0.1").unwrap(),
            ("10.0.0.1".parse().unwrap(), None)
        );
        assert_eq!(parse_endpoint("10.0.0.1:80").unwrap().1, Some(80));
        assert_eq!(parse_endpoint("[2001:db8::1]:443").unwrap().1, Some(443));
        assert_eq!(parse_endpoint("2001:db8::1").unwrap().1, None);
        assert!(parse_endpoint("10.0.0.1:99999").is_err());
        assert!(parse_endpoint("gateway").is_err());
    }
}
