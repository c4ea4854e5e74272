//! The NAT trail against the real kernel: namespaces, MASQUERADE, the agent binary, queries.
//! Needs root (CI and `cargo xtask test` run as root).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use nattrail::query::coverage::HoleKind;
use nattrail::query::flows::{FlowRow, FlowsQuery, flows};
use nattrail::query::proto::Proto;
use nattrail::query::who::{WhoAnswer, WhoQuery, WhoStatus, who};
use nattrail::store::schema::open_ro;
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::{FlowDone, FlowSpec, Server, Transport, make_flows, open_tcp};
use nattrail_lab::{GW_PUBLIC_V4, GW_PUBLIC_V6, LabOptions, NatLab, SERVER_V4, SERVER_V6};

const REPLY_BYTES: usize = 700;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

fn write_config(dir: &Scratch) -> Result<PathBuf> {
    let p = dir.join("agent.toml");
    std::fs::write(
        &p,
        "[docker]\nenabled = false\n[store]\ncommit_interval_ms = 100\n",
    )?;
    Ok(p)
}

fn utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

fn ask(
    db: &Path,
    ip: IpAddr,
    port: u16,
    at: SystemTime,
    tol: Duration,
    proto: Transport,
    dst: Option<SocketAddr>,
) -> Result<WhoAnswer> {
    let conn = open_ro(db)?;
    Ok(who(
        &conn,
        &WhoQuery {
            ip,
            port,
            at: utc(at),
            tolerance: tol,
            proto: Some(match proto {
                Transport::Tcp => Proto::Tcp,
                Transport::Udp => Proto::Udp,
            }),
            dst_ip: dst.map(|d| d.ip()),
            dst_port: dst.map(|d| d.port()),
            live: false,
        },
    )?)
}

fn specs(clients: &[IpAddr], servers: &[SocketAddr], n_each: usize, tag: &str) -> Vec<FlowSpec> {
    let mut v = Vec::new();
    for i in 0..n_each * 2 {
        let transport = if i % 2 == 0 {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        v.push(FlowSpec {
            token: format!("{tag}-{i}"),
            transport,
            client: clients[i % clients.len()],
            server: servers[(i / 2) % servers.len()],
            send_bytes: 64 + (i * 37) % 1400,
            hold: Duration::from_millis(25),
            client_port: 0,
        });
    }
    v
}

/// One conntrack entry: the kernel's id and the flow's start (ids come back).
type Entry = (u32, Option<String>);

/// For each flow: who with its public endpoint, an instant inside it, tolerance 0 and its
/// destination names exactly its client; the DESTROY counters match what was sent. Returns
/// how many conntrack entries carried more than one of the flows.
fn check_flows(
    db: &Path,
    server: &Server,
    done: &[FlowDone],
    public: IpAddr,
    ip_overhead: u64,
) -> Result<usize> {
    let mut entries: HashMap<Entry, Vec<(&FlowDone, FlowRow)>> = HashMap::new();
    for d in done {
        let seen = server
            .seen(&d.spec.token)
            .with_context(|| format!("server never saw {}", d.spec.token))?;
        ensure!(
            seen.peer.ip() == public,
            "{}: server saw {} not the gateway",
            d.spec.token,
            seen.peer
        );
        let ans = ask(
            db,
            public,
            seen.peer.port(),
            d.inside(),
            Duration::ZERO,
            d.spec.transport,
            Some(d.spec.server),
        )?;
        ensure!(
            ans.status == WhoStatus::Found && ans.matches.len() == 1,
            "{} ({} via {}): expected one match, got {:?}",
            d.spec.token,
            d.local,
            seen.peer,
            ans
        );
        let f = &ans.matches[0].flow;
        ensure!(
            f.internal_ip == d.local.ip().to_string() && f.internal_port == d.local.port(),
            "{}: named {}:{} but the client was {}",
            d.spec.token,
            f.internal_ip,
            f.internal_port,
            d.local
        );
        ensure!(
            f.end.is_some() && !f.end_inexact,
            "{}: closed flow without exact end: {f:?}",
            d.spec.token
        );
        entries
            .entry((f.conntrack_id, f.start.clone()))
            .or_default()
            .push((d, f.clone()));
    }
    for group in entries.values() {
        check_counters(group, ip_overhead)?;
    }
    Ok(entries.values().filter(|g| g.len() > 1).count())
}

/// The DESTROY counters of one conntrack entry against what its flows sent. A UDP client
/// that gets the port an earlier socket to the same server had, within the gateway's UDP
/// timeout, shares that socket's entry (as on any NAT gateway), so an entry may carry
/// several of the lab's flows.
fn check_counters(group: &[(&FlowDone, FlowRow)], ip_overhead: u64) -> Result<()> {
    let (d, f) = &group[0];
    let tokens: Vec<&str> = group.iter().map(|(d, _)| d.spec.token.as_str()).collect();
    let (po, bo, pi, bi) = (
        f.packets_out.context("no packets_out")?,
        f.bytes_out.context("no bytes_out")?,
        f.packets_in.context("no packets_in")?,
        f.bytes_in.context("no bytes_in")?,
    );
    let sent = |d: &FlowDone| d.spec.send_bytes.max(d.spec.token.len() + 1) as u64;
    match d.spec.transport {
        Transport::Udp => {
            let n = group.len() as u64;
            let attempts: u64 = group.iter().map(|(d, _)| u64::from(d.attempts)).sum();
            let size = |d: &FlowDone| sent(d) + ip_overhead + 8;
            // One datagram each way per flow, unless the lab had to resend.
            ensure!(
                po >= n && po <= attempts && pi >= n && pi <= po,
                "{tokens:?}: udp packets {po}/{pi}"
            );
            if group.len() == 1 {
                ensure!(
                    bo == po * size(d),
                    "{tokens:?}: udp bytes out {bo}, sent {}",
                    sent(d)
                );
            } else {
                let once: u64 = group.iter().map(|(d, _)| size(d)).sum();
                let most: u64 = group
                    .iter()
                    .map(|(d, _)| u64::from(d.attempts) * size(d))
                    .sum();
                ensure!(
                    (once..=most).contains(&bo) && (attempts > n || bo == once),
                    "{tokens:?}: udp bytes out {bo}, sent once {once}, at most {most}"
                );
            }
            ensure!(
                bi == pi * (REPLY_BYTES as u64 + ip_overhead + 8),
                "{tokens:?}: udp bytes in {bi}"
            );
        }
        Transport::Tcp => {
            // TIME_WAIT keeps a TCP client port from coming back this soon.
            ensure!(group.len() == 1, "{tokens:?}: tcp flows sharing one entry");
            let sent = sent(d);
            ensure!(po >= 3 && pi >= 2, "{tokens:?}: tcp packets {po}/{pi}");
            ensure!(
                bo >= sent + (ip_overhead + 20) * po,
                "{tokens:?}: tcp bytes out {bo} < {sent} + headers"
            );
            ensure!(
                bi >= REPLY_BYTES as u64 + (ip_overhead + 20) * pi,
                "{tokens:?}: tcp bytes in {bi}"
            );
            ensure!(
                bo <= sent + (ip_overhead + 60) * po,
                "{tokens:?}: tcp bytes out {bo} too many"
            );
        }
    }
    Ok(())
}

fn all_flows(db: &Path) -> Result<Vec<FlowRow>> {
    let conn = open_ro(db)?;
    Ok(flows(
        &conn,
        &FlowsQuery {
            limit: 1_000_000,
            ..Default::default()
        },
    )?)
}

fn us(s: &Option<String>) -> i64 {
    s.as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|d| d.timestamp_micros())
        .unwrap_or(0)
}

/// ≥ 200 TCP and ≥ 200 UDP flows from 24 clients through MASQUERADE limited to 8 ports.
#[test]
fn ipv4_trail_with_port_reuse() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 24,
        nat_ports: Some((40000, 40007)),
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(
        &lab.server_ns,
        IpAddr::V4(SERVER_V4),
        &[8080, 8081, 8082],
        REPLY_BYTES,
    )?;
    let dir = Scratch::new("v4")?;
    let (db, log) = (dir.join("trail.duckdb"), dir.join("agent.log"));
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &write_config(&dir)?, &db, &log)?;

    let clients: Vec<IpAddr> = lab.clients_v4.iter().map(|a| IpAddr::V4(*a)).collect();
    let mut done = make_flows(&lab.client_ns, specs(&clients, &server.addrs, 210, "v4"), 6)?;
    // A UDP client socket tuple used again within the gateway's UDP timeout is the same
    // conntrack entry, as on any NAT gateway (random ports do this now and then too).
    let twins = (0..2)
        .map(|i| FlowSpec {
            token: format!("v4-twin-{i}"),
            transport: Transport::Udp,
            client: clients[0],
            client_port: 39_000,
            server: server.addrs[1],
            send_bytes: 100 + 50 * i,
            hold: Duration::from_millis(25),
        })
        .collect();
    done.extend(make_flows(&lab.client_ns, twins, 1)?);
    let mut open = Vec::new();
    for (i, client) in clients.iter().take(3).enumerate() {
        open.push(open_tcp(
            &lab.client_ns,
            *client,
            server.addrs[0],
            &format!("v4-open-{i}"),
        )?);
    }
    std::thread::sleep(Duration::from_millis(300));
    lab.wait_conntrack_at_most(3, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(400));
    let now = SystemTime::now();
    let st = agent.stop()?;
    ensure!(st.success(), "agent exit {st}");

    let shared = check_flows(&db, &server, &done, IpAddr::V4(GW_PUBLIC_V4), 20)?;
    ensure!(shared >= 1, "the twin UDP flows did not share an entry");

    // Ports really were reused by different clients.
    let mut by_port: HashMap<(Transport, u16), HashSet<SocketAddr>> = HashMap::new();
    for d in &done {
        let seen = server.seen(&d.spec.token).unwrap();
        by_port
            .entry((d.spec.transport, seen.peer.port()))
            .or_default()
            .insert(d.local);
    }
    ensure!(
        by_port.values().any(|c| c.len() >= 5),
        "public ports were not reused: {by_port:?}"
    );

    // Between two uses of one public port, within tolerance of both: ambiguous, both listed.
    let rows = all_flows(&db)?;
    let mut groups: HashMap<(String, u16, String, Option<u16>), Vec<&FlowRow>> = HashMap::new();
    for r in rows.iter().filter(|r| r.end.is_some()) {
        groups
            .entry((r.proto.clone(), r.public_port, r.dst_ip.clone(), r.dst_port))
            .or_default()
            .push(r);
    }
    let mut pair = None;
    for g in groups.values_mut() {
        g.sort_by_key(|r| us(&r.start));
        for w in g.windows(2) {
            let gap = us(&w[1].start) - us(&w[0].end);
            if gap > 0
                && gap < 3_000_000
                && (&w[0].internal_ip, w[0].internal_port)
                    != (&w[1].internal_ip, w[1].internal_port)
            {
                pair = Some(((*w[0]).clone(), (*w[1]).clone(), gap));
                break;
            }
        }
        if pair.is_some() {
            break;
        }
    }
    let (a, b, gap) = pair.context("no two consecutive uses of a public port")?;
    let mid = us(&a.end) + gap / 2;
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(mid as u64);
    let tol = Duration::from_micros((gap / 2 + 200_000) as u64);
    let transport = if a.proto == "tcp" {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let dst = SocketAddr::new(a.dst_ip.parse()?, a.dst_port.unwrap());
    let ans = ask(
        &db,
        IpAddr::V4(GW_PUBLIC_V4),
        a.public_port,
        at,
        tol,
        transport,
        Some(dst),
    )?;
    ensure!(
        ans.status == WhoStatus::Ambiguous,
        "between two uses: {ans:?}"
    );
    let named: HashSet<(String, u16)> = ans
        .matches
        .iter()
        .map(|m| (m.flow.internal_ip.clone(), m.flow.internal_port))
        .collect();
    ensure!(
        named.contains(&(a.internal_ip.clone(), a.internal_port))
            && named.contains(&(b.internal_ip.clone(), b.internal_port)),
        "both uses must be listed: {ans:?}"
    );
    ensure!(
        ans.matches.iter().all(|m| !m.covers),
        "neither use covers the gap: {ans:?}"
    );

    // Flows still open show no end.
    for (i, (_stream, local)) in open.iter().enumerate() {
        let seen = server
            .seen(&format!("v4-open-{i}"))
            .context("open flow not seen")?;
        let ans = ask(
            &db,
            IpAddr::V4(GW_PUBLIC_V4),
            seen.peer.port(),
            now,
            Duration::ZERO,
            Transport::Tcp,
            Some(server.addrs[0]),
        )?;
        ensure!(ans.status == WhoStatus::Found, "open flow {local}: {ans:?}");
        let f = &ans.matches[0].flow;
        ensure!(
            f.end.is_none() && f.internal_port == local.port(),
            "open flow {local}: {f:?}"
        );
    }

    // The CLI gives the same answer, in the contract's JSON shape.
    let d = &done[17];
    let seen = server.seen(&d.spec.token).unwrap();
    let at = utc(d.inside()).to_rfc3339();
    let out = Command::new(bin())
        .args(["--db"])
        .arg(&db)
        .args([
            "who",
            "--ip",
            "198.51.100.1",
            "--port",
            &seen.peer.port().to_string(),
            "--at",
            &at,
            "--tolerance",
            "0s",
            "--json",
        ])
        .args(["--dst", &d.spec.server.to_string()])
        // TCP and UDP flows can hold the same public port at once; the abuse report names
        // the protocol, so the question does too.
        .args(["--proto", d.spec.transport.name()])
        .output()?;
    ensure!(
        out.status.success(),
        "cli who: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["status"] == "found", "cli: {v}");
    let m = &v["matches"][0];
    for key in [
        "internal_ip",
        "internal_port",
        "public_ip",
        "public_port",
        "dst_ip",
        "dst_port",
        "proto",
        "start",
        "end",
    ] {
        ensure!(m.get(key).is_some(), "cli who JSON lacks {key}: {v}");
    }
    ensure!(
        m["internal_ip"] == d.local.ip().to_string() && m["internal_port"] == d.local.port(),
        "cli: {v}"
    );
    ensure!(
        m["public_ip"] == "198.51.100.1" && m["start"].as_str().unwrap().ends_with('Z'),
        "cli: {v}"
    );

    drop(open);
    server.stop()?;
    Ok(())
}

/// Flows opened while the agent was stopped are found after it starts again; flows that ended
/// meanwhile are closed with an inexact end; nothing is duplicated.
#[test]
fn restart_recovers_flows_from_the_dump() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 4,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[9000], REPLY_BYTES)?;
    let dir = Scratch::new("restart")?;
    let (db, cfg) = (dir.join("trail.duckdb"), write_config(&dir)?);
    let c = |i: usize| IpAddr::V4(lab.clients_v4[i]);

    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("a1.log"))?;
    let kept = open_tcp(&lab.client_ns, c(0), server.addrs[0], "kept")?;
    let ends_while_down = open_tcp(&lab.client_ns, c(1), server.addrs[0], "ends-while-down")?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(agent.stop()?.success());
    let stopped_at = SystemTime::now();

    let born_while_down = open_tcp(&lab.client_ns, c(2), server.addrs[0], "born-while-down")?;
    drop(ends_while_down);
    lab.wait_conntrack_at_most(2, Duration::from_secs(60))?;

    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("a2.log"))?;
    std::thread::sleep(Duration::from_millis(500));
    let now = SystemTime::now();
    ensure!(agent.stop()?.success());

    let public = IpAddr::V4(GW_PUBLIC_V4);
    let port_of = |t: &str| server.seen(t).map(|s| s.peer.port()).context("not seen");

    let ans = ask(
        &db,
        public,
        port_of("born-while-down")?,
        now,
        Duration::ZERO,
        Transport::Tcp,
        None,
    )?;
    ensure!(ans.status == WhoStatus::Found, "born while down: {ans:?}");
    let f = &ans.matches[0].flow;
    ensure!(
        f.found_by_dump && f.end.is_none() && f.internal_port == born_while_down.1.port(),
        "{f:?}"
    );
    ensure!(
        us(&f.start) <= utc(now).timestamp_micros()
            && us(&f.start) >= utc(stopped_at).timestamp_micros() - 1_000_000,
        "kernel start time expected: {f:?}"
    );

    let ans = ask(
        &db,
        public,
        port_of("kept")?,
        now,
        Duration::ZERO,
        Transport::Tcp,
        None,
    )?;
    ensure!(
        ans.status == WhoStatus::Found && ans.matches.len() == 1,
        "kept flow must not be duplicated: {ans:?}"
    );
    ensure!(!ans.matches[0].flow.found_by_dump && ans.matches[0].flow.end.is_none());

    let ans = ask(
        &db,
        public,
        port_of("ends-while-down")?,
        stopped_at,
        Duration::ZERO,
        Transport::Tcp,
        None,
    )?;
    // The agent was stopped at that instant: the flow is listed, but the trail says it may
    // not be the whole story.
    ensure!(
        ans.status == WhoStatus::Incomplete
            && ans.matches.len() == 1
            && ans
                .holes
                .iter()
                .any(|h| h.kind == HoleKind::Stopped
                    && h.contains(utc(stopped_at).timestamp_micros())),
        "ended while down: {ans:?}"
    );
    let f = &ans.matches[0].flow;
    ensure!(
        f.end_inexact && f.end.is_some() && f.end_not_before.is_some(),
        "inexact end expected: {f:?}"
    );
    ensure!(
        us(&f.end_not_before) <= utc(stopped_at).timestamp_micros() + 1_000_000,
        "{f:?}"
    );

    drop((kept, born_while_down));
    server.stop()?;
    Ok(())
}

/// IPv6 masquerade flows are found the same way.
#[test]
fn ipv6_masquerade_flows() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 8,
        nat_ports: Some((41000, 41007)),
        ipv6: true,
        short_timeouts: true,
    })?;
    let server = Server::start(
        &lab.server_ns,
        IpAddr::V6(SERVER_V6),
        &[8443, 8444],
        REPLY_BYTES,
    )?;
    let dir = Scratch::new("v6")?;
    let (db, log) = (dir.join("trail.duckdb"), dir.join("agent.log"));
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &write_config(&dir)?, &db, &log)?;
    let clients: Vec<IpAddr> = lab.clients_v6.iter().map(|a| IpAddr::V6(*a)).collect();
    let done = make_flows(&lab.client_ns, specs(&clients, &server.addrs, 40, "v6"), 4)?;
    lab.wait_conntrack_at_most(0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(400));
    ensure!(agent.stop()?.success());
    check_flows(&db, &server, &done, IpAddr::V6(GW_PUBLIC_V6), 40)?;
    server.stop()?;
    Ok(())
}
