//! A NAT lab made of network namespaces: clients behind a MASQUERADE gateway, and a server.
//!
//! ```text
//!  client ns                 gateway ns                        server ns
//!  10.77.0.10..  ──veth──  10.77.0.1 | 198.51.100.1  ──veth──  198.51.100.2
//!  fd77::10..              fd77::1   | 2001:db8:77::1          2001:db8:77::2
//! ```
//!
//! Only documentation and private ranges, only inside namespaces this lab created: no packet
//! leaves the machine. Dropping the lab deletes the namespaces (and with them the veths).

pub mod agent;
pub mod booted;
pub mod docker;
pub mod http;
pub mod memory;
pub mod netns;
pub mod package;
pub mod packages;
pub mod scratch;
pub mod sockets;
pub mod traffic;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Gateway's inside IPv4 address.
pub const GW_INSIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Gateway's public IPv4 address (what the server sees).
pub const GW_PUBLIC_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Server's IPv4 address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Gateway's public IPv6 address.
pub const GW_PUBLIC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// Server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);

/// How to build the lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Number of client addresses (10.77.0.10 onwards, fd77::10 onwards).
    pub clients: u8,
    /// Restrict MASQUERADE's TCP/UDP source ports to this range (forces port reuse).
    pub nat_ports: Option<(u16, u16)>,
    /// Also set up IPv6 with ip6tables MASQUERADE.
    pub ipv6: bool,
    /// Conntrack timeouts in the gateway shortened so closed flows are destroyed in ~1 s.
    pub short_timeouts: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            clients: 4,
            nat_ports: None,
            ipv6: false,
            short_timeouts: true,
        }
    }
}

/// A running lab; dropped, it is torn down.
#[derive(Debug)]
pub struct NatLab {
    /// Client namespace name.
    pub client_ns: String,
    /// Gateway namespace name (where the agent runs).
    pub gw_ns: String,
    /// Server namespace name.
    pub server_ns: String,
    /// Client addresses, IPv4.
    pub clients_v4: Vec<Ipv4Addr>,
    /// Client addresses, IPv6 (empty without ipv6).
    pub clients_v6: Vec<Ipv6Addr>,
    /// Options it was built with.
    pub options: LabOptions,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command and fails with its stderr when it fails.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ns_sh(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

impl NatLab {
    /// Builds the namespaces, links, addresses, routes and NAT rules.
    pub fn create(options: LabOptions) -> Result<NatLab> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the NAT lab needs root (network namespaces, iptables)");
        }
        if options.clients == 0 || options.clients > 200 {
            bail!("clients must be between 1 and 200");
        }
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let p = format!("nt{id}");
        let lab = NatLab {
            client_ns: format!("{p}-c"),
            gw_ns: format!("{p}-g"),
            server_ns: format!("{p}-s"),
            clients_v4: (0..options.clients)
                .map(|i| Ipv4Addr::new(10, 77, 0, 10 + i))
                .collect(),
            clients_v6: if options.ipv6 {
                (0..options.clients)
                    .map(|i| Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10 + u16::from(i)))
                    .collect()
            } else {
                Vec::new()
            },
            options,
        };
        // Built while `lab` exists, so a failure half-way still tears down through Drop.
        lab.build(&p)?;
        Ok(lab)
    }

    fn build(&self, p: &str) -> Result<()> {
        let (c, g, s) = (&self.client_ns, &self.gw_ns, &self.server_ns);
        for ns in [c, g, s] {
            sh(&["ip", "netns", "add", ns])?;
            ns_sh(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        let (cv, gi, go, sv) = (
            format!("{p}c0"),
            format!("{p}g0"),
            format!("{p}g1"),
            format!("{p}s0"),
        );
        sh(&[
            "ip", "link", "add", &cv, "netns", c, "type", "veth", "peer", "name", &gi, "netns", g,
        ])?;
        sh(&[
            "ip", "link", "add", &go, "netns", g, "type", "veth", "peer", "name", &sv, "netns", s,
        ])?;
        for (ns, dev) in [(c, &cv), (g, &gi), (g, &go), (s, &sv)] {
            ns_sh(ns, &["ip", "link", "set", dev, "up"])?;
        }
        for a in &self.clients_v4 {
            ns_sh(c, &["ip", "addr", "add", &format!("{a}/24"), "dev", &cv])?;
        }
        ns_sh(
            c,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &GW_INSIDE_V4.to_string(),
            ],
        )?;
        ns_sh(
            g,
            &[
                "ip",
                "addr",
                "add",
                &format!("{GW_INSIDE_V4}/24"),
                "dev",
                &gi,
            ],
        )?;
        ns_sh(
            g,
            &[
                "ip",
                "addr",
                "add",
                &format!("{GW_PUBLIC_V4}/24"),
                "dev",
                &go,
            ],
        )?;
        ns_sh(
            s,
            &["ip", "addr", "add", &format!("{SERVER_V4}/24"), "dev", &sv],
        )?;
        ns_sh(g, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;

        let masq = |ipt: &str, proto: &str| -> Result<()> {
            let mut args = vec![
                ipt,
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                &go,
                "-p",
                proto,
                "-j",
                "MASQUERADE",
            ];
            let range;
            if let (Some((lo, hi)), true) = (
                self.options.nat_ports,
                proto != "icmp" && proto != "ipv6-icmp",
            ) {
                range = format!("{lo}-{hi}");
                args.extend_from_slice(&["--to-ports", &range]);
            }
            ns_sh(g, &args).map(|_| ())
        };
        for proto in ["tcp", "udp", "icmp"] {
            masq("iptables", proto)?;
        }
        if self.options.ipv6 {
            for (ns, dev) in [(c, &cv), (g, &gi), (g, &go), (s, &sv)] {
                ns_sh(
                    ns,
                    &[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv6.conf.{dev}.accept_dad=0"),
                    ],
                )?;
            }
            for a in &self.clients_v6 {
                ns_sh(
                    c,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{a}/64"),
                        "dev",
                        &cv,
                        "nodad",
                    ],
                )?;
            }
            ns_sh(
                c,
                &["ip", "-6", "route", "add", "default", "via", "fd77::1"],
            )?;
            ns_sh(
                g,
                &["ip", "-6", "addr", "add", "fd77::1/64", "dev", &gi, "nodad"],
            )?;
            ns_sh(
                g,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{GW_PUBLIC_V6}/64"),
                    "dev",
                    &go,
                    "nodad",
                ],
            )?;
            ns_sh(
                s,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{SERVER_V6}/64"),
                    "dev",
                    &sv,
                    "nodad",
                ],
            )?;
            ns_sh(g, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            for proto in ["tcp", "udp", "ipv6-icmp"] {
                masq("ip6tables", proto)?;
            }
        }
        if self.options.short_timeouts {
            for (k, v) in [
                ("nf_conntrack_tcp_timeout_time_wait", "1"),
                ("nf_conntrack_tcp_timeout_fin_wait", "1"),
                ("nf_conntrack_tcp_timeout_close_wait", "1"),
                ("nf_conntrack_tcp_timeout_last_ack", "1"),
                ("nf_conntrack_tcp_timeout_close", "1"),
                ("nf_conntrack_udp_timeout", "1"),
                ("nf_conntrack_udp_timeout_stream", "1"),
                ("nf_conntrack_icmp_timeout", "1"),
                ("nf_conntrack_icmpv6_timeout", "1"),
            ] {
                let path = format!("net.netfilter.{k}={v}");
                // Loading the conntrack module in this namespace happens with the first rule;
                // the sysctls exist from then on.
                ns_sh(g, &["sysctl", "-qw", &path])?;
            }
        }
        Ok(())
    }

    /// Client addresses of both families, IPv4 first.
    pub fn client_addrs(&self) -> Vec<IpAddr> {
        self.clients_v4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(self.clients_v6.iter().map(|a| IpAddr::V6(*a)))
            .collect()
    }

    /// Flows the gateway's conntrack table holds now.
    pub fn conntrack_count(&self) -> Result<u64> {
        let text = self.gw_sh(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])?;
        text.trim()
            .parse()
            .with_context(|| format!("reading nf_conntrack_count: {text:?}"))
    }

    /// Waits until the gateway tracks at most `n` flows (closed flows expired and destroyed).
    pub fn wait_conntrack_at_most(&self, n: u64, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // On an idle table the kernel's garbage collector may reap expired entries only
            // a minute later; a dump evicts them at once (sending their DESTROY events), as
            // a busy gateway's own lookups would.
            self.gw_sh(&["conntrack", "-L"])?;
            let c = self.conntrack_count()?;
            if c <= n {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("gateway still tracks {c} flows (want <= {n}) after {timeout:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Waits until the gateway tracks at most `n` source-NATed flows: the flows the agent
    /// stores, leaving out the gateway's own connections (an API client on loopback).
    pub fn wait_snat_flows_at_most(&self, n: usize, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let text = self.gw_sh(&["conntrack", "-L", "--src-nat"])?;
            let flows: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("tcp") || l.starts_with("udp") || l.starts_with("icmp"))
                .collect();
            if flows.len() <= n {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "gateway still tracks {} source-NATed flows (want <= {n}) after {timeout:?}, e.g. {:?}",
                    flows.len(),
                    &flows[..flows.len().min(3)]
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Runs a command inside the gateway namespace.
    pub fn gw_sh(&self, args: &[&str]) -> Result<String> {
        ns_sh(&self.gw_ns, args)
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.gw_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
