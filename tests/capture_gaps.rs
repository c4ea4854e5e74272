//! Kernel-side loss: a tiny receive buffer and a burst of 20,000 new flows through the lab NAT.
//! The agent must survive, record gaps whose lost counts add up to the kernel's drop counter,
//! recover every flow still alive, and answer "trail incomplete" inside the gaps.
//! Needs root (CI and `cargo xtask test` run as root).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use nattrail::conntrack::netlink_drops;
use nattrail::query::proto::Proto;
use nattrail::query::who::{WhoQuery, WhoStatus, who};
use nattrail::status;
use nattrail::store::schema::open_ro;
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::netns::run_in;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::{GW_PUBLIC_V4, LabOptions, NatLab, SERVER_V4};

const BURST: u16 = 20_000;
const FIRST_DST_PORT: u16 = 20_000;

/// The agent's event socket port id, from its start-up log line.
fn port_id(log: &str) -> Result<u32> {
    let line = log
        .lines()
        .find(|l| l.contains("subscribed to conntrack"))
        .context("no subscription line in the agent log")?;
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port_id="))
        .context("no port_id in the subscription line")?;
    Ok(v.trim_matches(|c: char| !c.is_ascii_digit()).parse()?)
}

/// One UDP datagram to each of BURST destination ports from one client socket: BURST new,
/// source-NATed flows as fast as the client can send. Returns each flow's send time by port.
fn burst(lab: &NatLab) -> Result<(u16, HashMap<u16, SystemTime>)> {
    let client = lab.clients_v4[0];
    run_in(&lab.client_ns, move || {
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 0))?;
        let sport = sock.local_addr()?.port();
        let mut sent = HashMap::new();
        for i in 0..BURST {
            let port = FIRST_DST_PORT + i;
            sent.insert(port, SystemTime::now());
            sock.send_to(b"burst", SocketAddr::new(IpAddr::V4(SERVER_V4), port))?;
        }
        Ok((sport, sent))
    })
}

/// Alive source-NATed UDP flows to the server: (conntrack id, destination port, public port).
fn alive_flows(lab: &NatLab) -> Result<Vec<(u32, u16, u16)>> {
    let text = lab.gw_sh(&[
        "conntrack",
        "-L",
        "-p",
        "udp",
        "-d",
        &SERVER_V4.to_string(),
        "-o",
        "id",
    ])?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("udp")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let field = |key: &str, nth: usize| -> Option<&str> {
            f.iter().filter_map(|w| w.strip_prefix(key)).nth(nth)
        };
        let (Some(id), Some(dport), Some(public)) =
            (field("id=", 0), field("dport=", 0), field("dport=", 1))
        else {
            bail!("unexpected conntrack line: {line}");
        };
        out.push((id.parse()?, dport.parse()?, public.parse()?));
    }
    Ok(out)
}

/// Waits until the agent has accounted for every kernel drop and emptied its backlog.
fn wait_quiescent(lab: &NatLab, db: &Path, port: u32) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut stable_since: Option<(Instant, u64)> = None;
    loop {
        let drops = netlink_drops::parse(&lab.gw_sh(&["cat", "/proc/net/netlink"])?, port)
            .context("agent socket not in /proc/net/netlink")?;
        let snap = status::read(db);
        let settled = snap.as_ref().is_some_and(|s| {
            s.conntrack.kernel_dropped == drops && s.stages.iter().all(|st| st.depth == 0)
        });
        match (settled, stable_since) {
            (true, Some((t, d))) if d == drops && t.elapsed() > Duration::from_secs(2) => {
                return Ok(drops);
            }
            (true, Some((_, d))) if d == drops => {}
            (true, _) => stable_since = Some((Instant::now(), drops)),
            (false, _) => stable_since = None,
        }
        if Instant::now() > deadline {
            bail!(
                "agent did not settle: kernel drops {drops}, snapshot {:?}",
                snap.map(|s| (s.conntrack, s.stages))
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn overflow_burst_records_gaps_and_resyncs() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 2,
        nat_ports: None,
        ipv6: false,
        // Default UDP timeout (30 s): the burst's flows stay alive through the checks.
        short_timeouts: false,
    })?;
    let dir = Scratch::new("gaps")?;
    let (db, cfg) = (dir.join("trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        "[docker]\nenabled = false\n[conntrack]\nrcvbuf_bytes = 4096\n[store]\ncommit_interval_ms = 100\n",
    )?;
    let agent = AgentProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_nattrail")),
        &lab.gw_ns,
        &cfg,
        &db,
        &dir.join("agent.log"),
    )?;
    let port = port_id(&agent.log_text())?;

    let (sport, sent) = burst(&lab)?;
    let drops = wait_quiescent(&lab, &db, port)?;
    let alive = alive_flows(&lab)?;
    let st = agent.stop()?;
    ensure!(st.success(), "agent exit {st}");
    ensure!(
        drops > 0,
        "a 4 KiB buffer must overflow under a 20,000-flow burst"
    );
    ensure!(
        alive.len() >= usize::from(BURST) * 9 / 10,
        "only {} of the burst's flows alive",
        alive.len()
    );

    // `nattrail status --json`: the stage counters and the same gaps, from the database.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nattrail"))
        .arg("--db")
        .arg(&db)
        .args(["status", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        st["agent_state"] == "stopped" && st["gaps_from"] == "database",
        "status: {st}"
    );
    let stage = &st["agent"]["stages"][0];
    ensure!(
        stage["name"] == "conntrack->writer"
            && stage["received"].as_u64()
                == stage["forwarded"]
                    .as_u64()
                    .map(|f| f + stage["dropped"].as_u64().unwrap_or(0)),
        "status stage counters: {stage}"
    );
    ensure!(
        st["agent"]["conntrack"]["kernel_dropped"].as_u64() == Some(drops),
        "status conntrack counters: {st}"
    );

    let conn = open_ro(&db)?;
    let (gaps, lost): (u64, u64) = conn.query_row(
        "SELECT count(*)::UBIGINT, coalesce(sum(lost), 0)::UBIGINT FROM capture_gaps WHERE source = 'conntrack'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    ensure!(gaps >= 1, "no capture gap recorded");
    ensure!(
        lost == drops,
        "gap rows count {lost} lost events, the kernel dropped {drops}"
    );
    let listed = st["gaps_24h"]
        .as_array()
        .map(|g| g.iter().filter(|g| g["source"] == "conntrack").count())
        .unwrap_or(0);
    ensure!(
        listed as u64 == gaps,
        "status lists {listed} gaps, the table {gaps}"
    );

    // Every flow alive after the burst is in the trail (live NEW or recovered by a dump).
    let mut stmt =
        conn.prepare("SELECT DISTINCT ct_id FROM conntrack_events WHERE kind IN (1, 3)")?;
    let known: HashSet<u32> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let missing: Vec<_> = alive.iter().filter(|a| !known.contains(&a.0)).collect();
    ensure!(
        missing.is_empty(),
        "{} alive flows not in the trail, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let mut stmt = conn.prepare("SELECT DISTINCT ct_id FROM conntrack_events WHERE kind = 1")?;
    let live_new: HashSet<u32> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let lost_flows: Vec<_> = alive.iter().filter(|a| !live_new.contains(&a.0)).collect();
    ensure!(
        !lost_flows.is_empty(),
        "every NEW arrived: no loss to check"
    );
    println!(
        "kernel dropped {drops}; {gaps} gap rows count {lost}; {} flows alive, {} recovered by dumps",
        alive.len(),
        lost_flows.len()
    );

    // For a flow whose NEW was lost, `who` at the time it was sent answers "incomplete".
    for &&(id, dport, public) in lost_flows.iter().take(20) {
        let at = sent[&dport] + Duration::from_millis(1);
        let ans = who(
            &conn,
            &WhoQuery {
                ip: IpAddr::V4(GW_PUBLIC_V4),
                port: public,
                at: DateTime::<Utc>::from(at),
                tolerance: Duration::ZERO,
                proto: Some(Proto::Udp),
                dst_ip: Some(IpAddr::V4(SERVER_V4)),
                dst_port: Some(dport),
                live: false,
            },
        )?;
        if ans.status != WhoStatus::Incomplete || ans.holes.is_empty() {
            let mut stmt = conn.prepare(
                "SELECT start::VARCHAR, \"end\"::VARCHAR, lost FROM capture_gaps ORDER BY start",
            )?;
            let gaps: Vec<(String, String, Option<u64>)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            bail!(
                "flow {id} (public port {public}, client port {sport}, dst port {dport}): {ans:?}; gaps {gaps:?}"
            );
        }
    }
    Ok(())
}
