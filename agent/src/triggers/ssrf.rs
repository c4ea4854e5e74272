//! The SSRF guard of webhook delivery: a webhook URL must not make the agent reach itself,
//! the host's link-local services (cloud metadata at 169.254.169.254) or anything else it
//! should not. The host is resolved once, every address is vetted, and the connection goes
//! only to a vetted address (our resolver is the HTTP client's), so a name cannot answer
//! differently between the check and the connect.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsrfError {
    /// The URL does not parse, or is not http(s) with a host.
    #[error("webhook URL {url:?} is invalid: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An address of the destination is in a forbidden range.
    #[error(
        "webhook destination {host} resolves to {addr}, a {kind} address; refused (allow it with [webhooks] allow if intended)"
    )]
    Forbidden {
        /// The host as written.
        host: String,
        /// The offending address (canonical form).
        addr: IpAddr,
        /// Which range.
        kind: &'static str,
    },
    /// The name does not resolve.
    #[error("webhook host {host} does not resolve: {reason}")]
    Unresolved {
        /// The host.
        host: String,
        /// The resolver's message.
        reason: String,
    },
}

/// The rules: forbidden ranges, minus an explicit allowlist.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<IpNet>,
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and -compatible (`::a.b.c.d`) addresses are the IPv4
/// address they carry: `::ffff:127.0.0.1` is loopback although `Ipv6Addr::is_loopback`
/// says no.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // Deprecated IPv4-compatible form; `::` and `::1` keep their IPv6 meaning.
            if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
                return IpAddr::V4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => {
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_unspecified() || a.octets()[0] == 0 {
                Some("unspecified")
            } else if a.is_multicast() {
                Some("multicast")
            } else if a.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_multicast() {
                Some("multicast")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else {
                None
            }
        }
    }
}

impl Guard {
    /// A guard with these ranges allowed despite the rules (tests, special cases).
    pub fn new(allow: Vec<IpNet>) -> Self {
        Guard { allow }
    }

    /// Vets one address of `host`.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<IpAddr, SsrfError> {
        let c = canonical(ip);
        if self.allow.iter().any(|n| n.contains(&c) || n.contains(&ip)) {
            return Ok(c);
        }
        match forbidden_kind(c) {
            Some(kind) => Err(SsrfError::Forbidden {
                host: host.to_string(),
                addr: c,
                kind,
            }),
            None => Ok(c),
        }
    }

    /// Parses a webhook URL and vets its host when it is an address (names are vetted when
    /// resolved). `127.1`, `2130706433` and `0x7f000001` parse as 127.0.0.1 here.
    pub fn check_url(&self, url: &str) -> Result<Url, SsrfError> {
        let bad = |reason: &str| SsrfError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let u = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(bad("only http and https are allowed"));
        }
        match u.host() {
            None => return Err(bad("no host")),
            Some(url::Host::Ipv4(a)) => {
                self.check_ip(url, IpAddr::V4(a))?;
            }
            Some(url::Host::Ipv6(a)) => {
                self.check_ip(url, IpAddr::V6(a))?;
            }
            Some(url::Host::Domain(_)) => {}
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(bad("credentials in the URL; use extra headers"));
        }
        Ok(u)
    }

    /// Resolves `host` and vets every address; all of them must pass.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, SsrfError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| SsrfError::Unresolved {
                host: host.to_string(),
                reason: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(SsrfError::Unresolved {
                host: host.to_string(),
                reason: "no address".into(),
            });
        }
        addrs
            .into_iter()
            .map(|a| Ok(SocketAddr::new(self.check_ip(host, a.ip())?, a.port())))
            .collect()
    }
}

/// The HTTP client's resolver: the guard's vetted answer, or an error naming the address.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<Guard>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = Arc::clone(&self.0);
        Box::pin(async move {
            let addrs = guard.resolve(name.as_str(), 0).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_table_is_refused() {
        let g = Guard::default();
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://[ff02::1]/",
            "http://[::]/",
        ] {
            match g.check_url(url) {
                Err(SsrfError::Forbidden { .. }) => {}
                other => panic!("{url}: {other:?}"),
            }
        }
        for url in [
            "ftp://example.org/",
            "http://[::1/",
            "not a url",
            "http://u:p@10.0.0.1/",
        ] {
            assert!(
                matches!(g.check_url(url), Err(SsrfError::BadUrl { .. })),
                "{url}"
            );
        }
        assert!(g.check_url("https://10.20.30.40:8443/hook").is_ok());
        assert!(g.check_url("https://hooks.example.org/x").is_ok());
        let err = g.check_url("http://127.1/").unwrap_err().to_string();
        assert!(
            err.contains("127.0.0.1") && err.contains("loopback"),
            "{err}"
        );
    }

    #[test]
    fn the_allowlist_opens_exactly_its_ranges() {
        let g = Guard::new(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(g.check_url("http://127.0.0.1:9000/").is_ok());
        assert!(g.check_url("http://[::ffff:127.0.0.1]:9000/").is_ok());
        assert!(g.check_url("http://127.0.0.2/").is_err());
    }

    #[tokio::test]
    async fn names_are_vetted_after_resolution() {
        let g = Guard::default();
        let err = g.resolve("localhost", 80).await.unwrap_err();
        assert!(
            matches!(
                err,
                SsrfError::Forbidden {
                    kind: "loopback",
                    ..
                }
            ),
            "{err}"
        );
        let allowed = Guard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(allowed.resolve("localhost", 80).await.is_ok());
    }
}
