//! The SSRF guard of webhook delivery: a webhook URL must not make the agent reach itself,
//! the host's link-local services (cloud metadata at 169.254.169.254) or anything else it
//! should not. The host is resolved once, every address is vetted, and the connection goes
//! only to a vetted address (our resolver is the HTTP client's), so a name cannot answer
//! differently between the check and the connect.
//!
//! IPv6 addresses that lead to an IPv4 address are vetted as that IPv4 address: mapped and
//! compatible forms, NAT64's well-known prefix and 6to4. The host's own interface addresses
//! are refused too, read afresh at every check since they come and go (DHCP, VPNs, bridges).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsrfError {
    /// The URL does not parse, or is not http(s) with a host. The URL itself is left out:
    /// its query or user info may hold a token, and this text reaches logs.
    #[error("webhook URL is invalid: {reason}")]
    BadUrl {
        /// What is wrong with it.
        reason: String,
    },
    /// An address of the destination is in a forbidden range.
    #[error(
        "webhook destination {host} resolves to {addr}, a {kind} address; refused (allow it with [webhooks] allow if intended)"
    )]
    Forbidden {
        /// The host: a name as written, or an address as the URL parser normalised it.
        host: String,
        /// The offending address: canonical, or the IPv4 address a NAT64 or 6to4 address
        /// embeds.
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
    /// The host's own addresses could not be read, so a destination cannot be told apart
    /// from them; refused rather than let through.
    #[error("cannot read the host's interface addresses to vet a webhook destination: {reason}")]
    Interfaces {
        /// The system's message.
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

/// The IPv4 address a NAT64 (`64:ff9b::/96`, RFC 6052, in the last 32 bits) or 6to4
/// (`2002::/16`, RFC 3056, in bits 16..48) address leads to: the translator or relay forwards
/// there, so it is vetted like that address. An embedded public address passes as it would
/// alone: on an IPv6-only host, DNS64 answers with such addresses for every IPv4-only
/// receiver, and the translator reaches nothing the address alone would not.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32))
    } else {
        None
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
            } else if a.segments()[..3] == [0x64, 0xff9b, 1] {
                // RFC 8215's local-use NAT64 prefix. An operator carves a network-specific
                // prefix of /48 to /96 out of it, so where the IPv4 address sits (RFC 6052
                // has six layouts) cannot be known here; and it routes only to the
                // operator's own translator, never to a public receiver. The whole /48 is
                // refused.
                Some("local-use NAT64")
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

    /// Vets one address of `host`; the answer is the address to connect to.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<IpAddr, SsrfError> {
        self.vet(host, ip, &mut None)
    }

    /// `check_ip` with the host's addresses read at most once into `local` across calls.
    fn vet(
        &self,
        host: &str,
        ip: IpAddr,
        local: &mut Option<Vec<IpAddr>>,
    ) -> Result<IpAddr, SsrfError> {
        let c = canonical(ip);
        // The connection still goes to `c`: through the NAT64 translator or 6to4 relay.
        let inner = match c {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let allowed = |a: IpAddr| self.allow.iter().any(|n| n.contains(&a));
        if allowed(ip) || allowed(c) || inner.is_some_and(allowed) {
            return Ok(c);
        }
        let refuse = |addr, kind| SsrfError::Forbidden {
            host: host.to_string(),
            addr,
            kind,
        };
        let vetted = || std::iter::once(c).chain(inner);
        if let Some((a, kind)) = vetted().find_map(|a| forbidden_kind(a).map(|k| (a, k))) {
            return Err(refuse(a, kind));
        }
        let local = match local {
            Some(l) => l,
            None => local.insert(local_addresses()?),
        };
        match vetted().find(|a| local.contains(a)) {
            Some(a) => Err(refuse(a, "local interface")),
            None => Ok(c),
        }
    }

    /// Parses a webhook URL and vets its host when it is an address (names are vetted when
    /// resolved). `127.1`, `2130706433` and `0x7f000001` parse as 127.0.0.1 here.
    pub fn check_url(&self, url: &str) -> Result<Url, SsrfError> {
        let bad = |reason: &str| SsrfError::BadUrl {
            reason: reason.to_string(),
        };
        let u = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(bad("only http and https are allowed"));
        }
        match u.host() {
            None => return Err(bad("no host")),
            // The host alone names the destination in errors: the whole URL may carry a token.
            Some(url::Host::Ipv4(a)) => {
                self.check_ip(u.host_str().unwrap_or_default(), IpAddr::V4(a))?;
            }
            Some(url::Host::Ipv6(a)) => {
                self.check_ip(u.host_str().unwrap_or_default(), IpAddr::V6(a))?;
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
        let mut local = None;
        addrs
            .into_iter()
            .map(|a| {
                Ok(SocketAddr::new(
                    self.vet(host, a.ip(), &mut local)?,
                    a.port(),
                ))
            })
            .collect()
    }
}

/// Every address on the host's interfaces, as of now.
fn local_addresses() -> Result<Vec<IpAddr>, SsrfError> {
    let ifaddrs = nix::ifaddrs::getifaddrs().map_err(|e| SsrfError::Interfaces {
        reason: e.to_string(),
    })?;
    Ok(ifaddrs
        .filter_map(|i| i.address)
        .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        })
        .collect())
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
        for (url, host, addr, kind) in [
            ("http://127.0.0.1/", "127.0.0.1", "127.0.0.1", "loopback"),
            ("http://127.1/", "127.0.0.1", "127.0.0.1", "loopback"),
            ("http://2130706433/", "127.0.0.1", "127.0.0.1", "loopback"),
            ("http://0x7f000001/", "127.0.0.1", "127.0.0.1", "loopback"),
            ("http://0.0.0.0/", "0.0.0.0", "0.0.0.0", "unspecified"),
            ("http://[::1]/", "[::1]", "::1", "loopback"),
            (
                "http://[::ffff:127.0.0.1]/",
                "[::ffff:7f00:1]",
                "127.0.0.1",
                "loopback",
            ),
            (
                "http://[::127.0.0.1]/",
                "[::7f00:1]",
                "127.0.0.1",
                "loopback",
            ),
            (
                "http://169.254.169.254/latest/meta-data",
                "169.254.169.254",
                "169.254.169.254",
                "link-local",
            ),
            ("http://[fe80::1]/", "[fe80::1]", "fe80::1", "link-local"),
            ("http://224.0.0.1/", "224.0.0.1", "224.0.0.1", "multicast"),
            (
                "http://255.255.255.255/",
                "255.255.255.255",
                "255.255.255.255",
                "broadcast",
            ),
            ("http://[ff02::1]/", "[ff02::1]", "ff02::1", "multicast"),
            ("http://[::]/", "[::]", "::", "unspecified"),
            // NAT64, well-known prefix: the last 32 bits.
            (
                "http://[64:ff9b::7f00:1]/",
                "[64:ff9b::7f00:1]",
                "127.0.0.1",
                "loopback",
            ),
            (
                "http://[64:ff9b::169.254.169.254]/",
                "[64:ff9b::a9fe:a9fe]",
                "169.254.169.254",
                "link-local",
            ),
            (
                "http://[64:ff9b::]/",
                "[64:ff9b::]",
                "0.0.0.0",
                "unspecified",
            ),
            // NAT64, local-use prefix: the whole /48, a public IPv4 inside or not.
            (
                "http://[64:ff9b:1::c633:6401]/",
                "[64:ff9b:1::c633:6401]",
                "64:ff9b:1::c633:6401",
                "local-use NAT64",
            ),
            (
                "http://[64:ff9b:1:ffff:ffff:ffff:ffff:ffff]/",
                "[64:ff9b:1:ffff:ffff:ffff:ffff:ffff]",
                "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
                "local-use NAT64",
            ),
            // 6to4: bits 16..48.
            (
                "http://[2002:7f00:1::]/",
                "[2002:7f00:1::]",
                "127.0.0.1",
                "loopback",
            ),
            (
                "http://[2002:a9fe:a9fe::1]/x?token=SECRETQ",
                "[2002:a9fe:a9fe::1]",
                "169.254.169.254",
                "link-local",
            ),
            (
                "http://[2002:e000:1:5::9]/",
                "[2002:e000:1:5::9]",
                "224.0.0.1",
                "multicast",
            ),
        ] {
            let want = SsrfError::Forbidden {
                host: host.into(),
                addr: addr.parse().unwrap(),
                kind,
            };
            assert_eq!(g.check_url(url), Err(want), "{url}");
        }
        for (url, reason) in [
            ("ftp://example.org/", "only http and https are allowed"),
            ("http://[::1/", "invalid IPv6 address"),
            ("not a url", "relative URL without a base"),
            (
                "http://u:SECRETP@10.0.0.1/",
                "credentials in the URL; use extra headers",
            ),
        ] {
            let want = SsrfError::BadUrl {
                reason: reason.into(),
            };
            assert_eq!(g.check_url(url), Err(want), "{url}");
        }
        let err = g
            .check_url("http://u:SECRETP@127.1/?token=SECRETQ")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "webhook destination 127.0.0.1 resolves to 127.0.0.1, a loopback address; refused \
             (allow it with [webhooks] allow if intended)"
        );
        // Public destinations pass; NAT64 and 6to4 ones are connected to as written, through
        // the translator or relay.
        for (url, connect) in [
            ("https://10.20.30.40:8443/hook", "10.20.30.40"),
            ("http://198.51.100.7/", "198.51.100.7"),
            ("http://[2001:db8::7]/", "2001:db8::7"),
            ("http://[64:ff9b::c633:6407]/", "64:ff9b::c633:6407"),
            ("http://[64:ff9b::203.0.113.9]/", "64:ff9b::cb00:7109"),
            ("http://[2002:c633:6407::1]/", "2002:c633:6407::1"),
            // Neither the well-known /96 nor the local-use /48.
            ("http://[64:ff9b:2::7f00:1]/", "64:ff9b:2::7f00:1"),
        ] {
            let u = g.check_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            let host = u.host_str().unwrap().trim_matches(['[', ']']);
            let ip: IpAddr = host.parse().unwrap();
            assert_eq!(g.check_ip(host, ip), Ok(connect.parse().unwrap()), "{url}");
        }
        assert!(g.check_url("https://hooks.example.org/x").is_ok());
    }

    #[test]
    fn embedded_ipv4_is_allowed_with_the_address_it_leads_to() {
        let g = Guard::new(vec!["169.254.169.254/32".parse().unwrap()]);
        for ip in ["64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(g.check_ip("h", ip), Ok(ip));
        }
        let ip: IpAddr = "2002:a9fe:a9ff::".parse().unwrap();
        assert_eq!(
            g.check_ip("h", ip),
            Err(SsrfError::Forbidden {
                host: "h".into(),
                addr: "169.254.169.255".parse().unwrap(),
                kind: "link-local",
            })
        );
    }

    /// Runs `f` on a thread of its own in a new network namespace holding only a down
    /// loopback and a veth pair, one end with 198.18.77.1 (benchmark range): the host's
    /// interfaces stay untouched and the test does not depend on them. Needs root; veth
    /// rather than dummy, which not every kernel (this container's) has.
    fn in_private_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) (the test needs root)");
            ip(&[
                "link",
                "add",
                "nt-ssrf-test",
                "type",
                "veth",
                "peer",
                "name",
                "nt-ssrf-peer",
            ]);
            ip(&["addr", "add", "198.18.77.1/32", "dev", "nt-ssrf-test"]);
            f()
        })
        .join()
        .unwrap()
    }

    /// Runs `ip` in the calling thread's network namespace (children inherit it).
    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_hosts_own_addresses_are_refused_as_they_are_now() {
        in_private_netns(|| {
            let g = Guard::default();
            let refused = |host: &str, addr: &str| {
                Err(SsrfError::Forbidden {
                    host: host.into(),
                    addr: addr.parse().unwrap(),
                    kind: "local interface",
                })
            };
            assert_eq!(
                g.check_url("http://198.18.77.1:8080/hook"),
                refused("198.18.77.1", "198.18.77.1")
            );
            assert_eq!(
                g.check_url("http://[::ffff:198.18.77.1]/"),
                refused("[::ffff:c612:4d01]", "198.18.77.1")
            );
            assert_eq!(
                g.check_url("http://[64:ff9b::c612:4d01]/"),
                refused("[64:ff9b::c612:4d01]", "198.18.77.1")
            );
            assert_eq!(
                g.check_url("http://[2002:c612:4d01::5]/"),
                refused("[2002:c612:4d01::5]", "198.18.77.1")
            );
            assert!(g.check_url("http://198.18.77.2/").is_ok());

            // An IPv6 address too, once the interface is up (DAD off: usable at once).
            ip(&["link", "set", "nt-ssrf-test", "up"]);
            ip(&[
                "addr",
                "add",
                "2001:db8:77::1/128",
                "dev",
                "nt-ssrf-test",
                "nodad",
            ]);
            assert_eq!(
                g.check_url("http://[2001:db8:77::1]/"),
                refused("[2001:db8:77::1]", "2001:db8:77::1")
            );
            assert!(g.check_url("http://[2001:db8:77::2]/").is_ok());

            let allowed = Guard::new(vec!["198.18.77.0/24".parse().unwrap()]);
            assert!(allowed.check_url("http://198.18.77.1/").is_ok());

            // Read at check time: once the address is gone, it is an ordinary one.
            ip(&["addr", "del", "198.18.77.1/32", "dev", "nt-ssrf-test"]);
            assert!(g.check_url("http://198.18.77.1/").is_ok());
        });
    }

    #[test]
    fn this_machines_interface_addresses_are_refused() {
        let g = Guard::default();
        for a in local_addresses().unwrap() {
            let c = canonical(a);
            let want = forbidden_kind(c).unwrap_or("local interface");
            match g.check_ip("h", a) {
                Err(SsrfError::Forbidden { addr, kind, .. }) => {
                    assert_eq!((addr, kind), (c, want), "{a}");
                }
                other => panic!("{a}: {other:?}"),
            }
        }
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
