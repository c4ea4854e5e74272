//! The eBPF socket programs on the real kernel, with the real dockerd: flows a container
//! opens through the host's MASQUERADE (TCP connect, connected UDP, unconnected sendto) are
//! named by `who` with the container, its workload, the pid and the comm; a second container
//! that takes the first one's address at once has its own flows named after it; a host
//! process behind a source NAT is named with its pid and exe.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::DateTime;
use nattrail::query::attribution::{OwnerStatus, attribute};
use nattrail::query::flows::{FlowRow, FlowsQuery, flows};
use nattrail::query::who::{WhoQuery, who};
use nattrail::store::database::{Database, OpenOptions};
use nattrail::store::schema::open_ro;
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::Server;
use nattrail_lab::{docker, sh, sockets};

const SERVER: &str = "203.0.113.2";
const HOST_SIDE: &str = "203.0.113.1";
/// The host process's flows leave through a source NAT to this address.
const HOST_SNAT: &str = "203.0.113.3";
const TCP_PORT: u16 = 7001;
const UDP_PORT: u16 = 7002;
const HOST_PORT: u16 = 7003;
const PER_KIND: usize = 100;

/// The server namespace on a veth from the host, and the host's NAT rule; removed on drop.
struct ServerNet {
    ns: String,
    host_if: String,
    rule: Vec<String>,
}

impl ServerNet {
    fn create() -> Result<ServerNet> {
        let id = std::process::id() % 100_000;
        let (ns, host_if, peer) = (format!("nts{id}"), format!("nth{id}"), format!("ntp{id}"));
        let _ = sh(&["ip", "netns", "del", &ns]);
        let _ = sh(&["ip", "link", "del", &host_if]);
        sh(&["ip", "netns", "add", &ns])?;
        let net = ServerNet {
            ns: ns.clone(),
            host_if: host_if.clone(),
            rule: Vec::new(),
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ])?;
        sh(&["ip", "link", "set", &peer, "netns", &ns])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_SIDE}/24"),
            "dev",
            &host_if,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_SNAT}/24"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        let server = format!("{SERVER}/24");
        for args in [
            ["addr", "add", server.as_str(), "dev", peer.as_str()],
            ["link", "set", peer.as_str(), "up", ""],
            ["link", "set", "lo", "up", ""],
        ] {
            let mut full = vec!["ip", "-n", ns.as_str()];
            full.extend(args.into_iter().filter(|a| !a.is_empty()));
            sh(&full)?;
        }
        let mut net = net;
        net.rule = [
            "POSTROUTING",
            "-s",
            HOST_SIDE,
            "-d",
            SERVER,
            "-p",
            "tcp",
            "--dport",
            &HOST_PORT.to_string(),
            "-j",
            "SNAT",
            "--to-source",
            HOST_SNAT,
        ]
        .map(String::from)
        .to_vec();
        let mut add = vec!["iptables", "-t", "nat", "-I"];
        add.extend(net.rule.iter().map(String::as_str));
        sh(&add)?;
        Ok(net)
    }
}

impl Drop for ServerNet {
    fn drop(&mut self) {
        if !self.rule.is_empty() {
            let mut del = vec!["iptables", "-t", "nat", "-D"];
            del.extend(self.rule.iter().map(String::as_str));
            let _ = sh(&del);
        }
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// Runs a container with the helper mounted; returns its address on Docker's bridge.
fn container(name: &str, service: &str, helper_dir: &std::path::Path) -> Result<IpAddr> {
    let _ = sh(&["docker", "rm", "-f", name]);
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        name,
        "--label",
        &format!("com.docker.compose.service={service}"),
        "-v",
        &format!("{}:/h:ro", helper_dir.display()),
        docker::IMAGE,
        "sleep",
        "300",
    ])?;
    let ip = sh(&[
        "docker",
        "inspect",
        "-f",
        "{{.NetworkSettings.IPAddress}}",
        name,
    ])?;
    ip.trim()
        .parse()
        .with_context(|| format!("the address of {name}: {ip:?}"))
}

/// Opens `count` flows of each kind from the container; returns (kind, source port).
fn container_flows(name: &str, count: usize) -> Result<Vec<(&'static str, u16)>> {
    let mut out = Vec::new();
    for (kind, port) in [("tcp", TCP_PORT), ("udp", UDP_PORT), ("sendto", UDP_PORT)] {
        let printed = sh(&[
            "docker",
            "exec",
            name,
            "/h/nt-sockets",
            kind,
            SERVER,
            &port.to_string(),
            &count.to_string(),
        ])?;
        let ports = sockets::ports(&printed)?;
        ensure!(ports.len() == count, "{name} {kind}: {} flows", ports.len());
        out.extend(ports.into_iter().map(|p| (kind, p)));
    }
    Ok(out)
}

/// The flows of the trail from `src`:`sport` to `dport`.
fn flows_from(all: &[FlowRow], src: IpAddr, sport: u16, dport: u16) -> Vec<&FlowRow> {
    all.iter()
        .filter(|f| {
            f.internal_ip == src.to_string()
                && f.internal_port == sport
                && f.dst_port == Some(dport)
        })
        .collect()
}

/// The one flow of the trail from `src`:`sport` to `dport`.
fn flow_of(all: &[FlowRow], src: IpAddr, sport: u16, dport: u16) -> Result<&FlowRow> {
    one(flows_from(all, src, sport, dport), src, sport, dport)
}

/// The flow from `src`:`sport` to `dport` of the first container (`first`: started before
/// `second_from`) or of the second. The two share an address and each picks its own source
/// ports, so one port may carry a flow of each (CI saw two TCP flows from one port). A UDP
/// packet of the second may have joined the first one's flow instead: that flow is the
/// answer when the second has none of its own.
fn container_flow(
    all: &[FlowRow],
    (src, sport, dport): (IpAddr, u16, u16),
    first: bool,
    second_from: DateTime<chrono::Utc>,
) -> Result<&FlowRow> {
    let from = flows_from(all, src, sport, dport);
    let own: Vec<&FlowRow> = from
        .iter()
        .copied()
        .filter(|f| {
            f.start_us
                .is_some_and(|s| (s < second_from.timestamp_micros()) == first)
        })
        .collect();
    one(
        if own.is_empty() && !first { from } else { own },
        src,
        sport,
        dport,
    )
}

fn one(found: Vec<&FlowRow>, src: IpAddr, sport: u16, dport: u16) -> Result<&FlowRow> {
    ensure!(
        found.len() == 1,
        "flows from {src}:{sport} to port {dport}: {}",
        found.len()
    );
    Ok(found[0])
}

/// Asks `who` about the flow's public address and port at its start, as an abuse report
/// would, and returns the owner of the candidate that is this flow.
fn who_owns(
    conn: &duckdb::Connection,
    f: &FlowRow,
) -> Result<nattrail::query::attribution::Attribution> {
    let start = f.start.as_deref().context("the flow's start")?;
    let at = DateTime::parse_from_rfc3339(start)?.to_utc() + chrono::Duration::microseconds(500);
    let mut ans = who(
        conn,
        &WhoQuery {
            ip: f.public_ip.parse()?,
            port: f.public_port,
            at,
            tolerance: Duration::ZERO,
            proto: None,
            dst_ip: None,
            dst_port: None,
            live: false,
        },
    )?;
    attribute(conn, ans.matches.iter_mut().map(|m| &mut m.flow))?;
    let m = ans
        .matches
        .into_iter()
        .find(|m| m.flow.internal_ip == f.internal_ip && m.flow.internal_port == f.internal_port)
        .with_context(|| format!("who {}:{} at {at}", f.public_ip, f.public_port))?;
    m.flow.attribution.context("an attribution")
}

#[test]
fn flows_are_attributed_to_their_process_and_container() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    let dir = Scratch::new("ebpf-sockets")?;
    let helper_dir = dir.join("helper");
    std::fs::create_dir_all(&helper_dir)?;
    let helper = sockets::build(&helper_dir)?;
    let net = ServerNet::create()?;
    let server = Server::start(
        &net.ns,
        SERVER.parse()?,
        &[TCP_PORT, UDP_PORT, HOST_PORT],
        0,
    )?;
    let (db, cfg, log) = (
        dir.join("trail.duckdb"),
        dir.join("agent.toml"),
        dir.join("agent.log"),
    );
    std::fs::write(
        &cfg,
        "[api]\nenabled = false\n[webhooks]\nenabled = false\n[store]\ncommit_interval_ms = 100\n",
    )?;
    let mut agent =
        AgentProcess::start_on_host(&nattrail_lab::agent::built_binary(), &cfg, &db, &log)?;
    agent.wait_for_log("eBPF socket programs attached", Duration::from_secs(15))?;
    agent.wait_for_log("nattrail running", Duration::from_secs(15))?;

    let id = std::process::id();
    let (a, b) = (format!("ntsock-a-{id}"), format!("ntsock-b-{id}"));
    let a_ip = container(&a, "shop-a", &helper_dir)?;
    let a_flows = container_flows(&a, PER_KIND)?;
    sh(&["docker", "rm", "-f", &a])?;
    let a_gone = chrono::Utc::now();
    // Docker hands the address to the next container at once.
    let b_ip = container(&b, "shop-b", &helper_dir)?;
    ensure!(a_ip == b_ip, "the second container took {b_ip}, not {a_ip}");
    let b_flows = container_flows(&b, PER_KIND)?;
    sh(&["docker", "rm", "-f", &b])?;
    // A host process, through the source NAT.
    let out = std::process::Command::new(&helper)
        .args(["tcp", SERVER, &HOST_PORT.to_string(), "5"])
        .output()?;
    ensure!(out.status.success(), "host helper: {out:?}");
    let host_ports = sockets::ports(&String::from_utf8_lossy(&out.stdout))?;
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(agent.stop()?.success(), "agent exit");
    server.stop()?;

    let conn = open_ro(&db)?;
    // `who` asked as the CLI asks it: read-only, DuckDB's built-in functions only.
    let cli = Database::open(&db, OpenOptions::lookup())?.connect()?;
    let gaps: i64 = conn.query_row(
        "SELECT count(*) FROM capture_gaps WHERE source = 'ebpf'",
        [],
        |r| r.get(0),
    )?;
    ensure!(gaps == 0, "{gaps} eBPF gaps");
    let all = flows(
        &conn,
        &FlowsQuery {
            limit: 100_000,
            ..FlowsQuery::default()
        },
    )?;
    // A UDP packet of the second container whose tuple an entry of the first one still holds
    // in conntrack (its UDP timeout outlives the container) belongs to that flow: the trail
    // has one flow, begun by the first container, and it must be named after the first.
    let mut named: HashMap<(&str, &str), usize> = HashMap::new();
    let mut joined_earlier = 0;
    for (owner, ip, list) in [(&a, a_ip, &a_flows), (&b, b_ip, &b_flows)] {
        for &(kind, sport) in list.iter() {
            let dport = if kind == "tcp" { TCP_PORT } else { UDP_PORT };
            let f = container_flow(&all, (ip, sport, dport), owner == &a, a_gone)?;
            ensure!(
                f.public_ip == HOST_SIDE,
                "{kind} {sport} left as {}",
                f.public_ip
            );
            let start = DateTime::parse_from_rfc3339(f.start.as_deref().context("a start")?)?;
            let (expected, workload) = if start < a_gone {
                (&a, "shop-a")
            } else {
                (&b, "shop-b")
            };
            let who = who_owns(&cli, f)?;
            assert_eq!(
                (
                    who.status,
                    who.container.as_deref(),
                    who.workload.as_deref(),
                    who.comm.as_deref(),
                    who.exe.as_deref(),
                ),
                (
                    OwnerStatus::Local,
                    Some(expected.as_str()),
                    Some(workload),
                    Some("nt-sockets"),
                    Some("/h/nt-sockets"),
                ),
                "{owner} {kind} from {ip}:{sport} (public {}:{})",
                f.public_ip,
                f.public_port
            );
            ensure!(who.pid.is_some_and(|p| p > 1), "a pid: {who:?}");
            if expected == owner {
                *named.entry((owner.as_str(), kind)).or_default() += 1;
            } else {
                ensure!(kind != "tcp", "a TCP flow of {owner} began before it ran");
                joined_earlier += 1;
            }
        }
    }
    eprintln!("named: {named:?}; packets of {b} in flows {a} began: {joined_earlier}");
    for kind in ["tcp", "udp", "sendto"] {
        assert_eq!(
            named.get(&(a.as_str(), kind)).copied(),
            Some(PER_KIND),
            "{a} {kind}: flows named after their container"
        );
    }
    let b_named: usize = named
        .iter()
        .filter(|((o, _), _)| *o == b.as_str())
        .map(|(_, n)| n)
        .sum();
    assert_eq!(b_named + joined_earlier, 3 * PER_KIND, "every flow of {b}");
    assert_eq!(named.get(&(b.as_str(), "tcp")).copied(), Some(PER_KIND));
    for sport in host_ports {
        let f = flow_of(&all, HOST_SIDE.parse()?, sport, HOST_PORT)?;
        ensure!(
            f.public_ip == HOST_SNAT,
            "host flow left as {}",
            f.public_ip
        );
        let who = who_owns(&cli, f)?;
        assert_eq!(
            (who.status, who.exe.as_deref(), who.container.as_deref()),
            (
                OwnerStatus::Local,
                Some(helper.to_str().context("helper path")?),
                None
            ),
            "the host process's flow from port {sport}"
        );
        ensure!(who.pid.is_some_and(|p| p > 1), "a pid: {who:?}");
    }
    Ok(())
}
