//! The agent SIGKILLed in the middle of ingest: on restart, every flow committed before the
//! kill is in the trail, the loss is at most what arrived after the last commit, and that
//! window is recorded as a gap. Needs root (CI and `cargo xtask test` run as root).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, ensure};
use chrono::{DateTime, Utc};
use nattrail::query::coverage::HoleKind;
use nattrail::query::flows::{FlowsQuery, flows};
use nattrail::query::proto::Proto;
use nattrail::query::who::{WhoQuery, WhoStatus, who};
use nattrail::store::schema::open_ro;
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::netns::spawn_in;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::{GW_PUBLIC_V4, LabOptions, NatLab, SERVER_V4};

const FIRST_DST_PORT: u16 = 30_000;
const FLOWS: u16 = 8_000;
/// One new flow every half millisecond: the kill lands in a steady stream.
const PACE: Duration = Duration::from_micros(500);
/// The commit interval configured below.
const COMMIT: Duration = Duration::from_millis(1_000);

#[test]
fn sigkill_mid_ingest_loses_at_most_the_last_commit() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 1,
        nat_ports: None,
        ipv6: false,
        short_timeouts: false,
    })?;
    let dir = Scratch::new("crash")?;
    let (db, cfg) = (dir.join("trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[docker]\nenabled = false\n[store]\ncommit_interval_ms = {}\n",
            COMMIT.as_millis()
        ),
    )?;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_nattrail"));
    let agent = AgentProcess::start(bin, &lab.gw_ns, &cfg, &db, &dir.join("first.log"))?;

    // One socket, one datagram to each destination port: a new source-NATed flow each.
    let client = lab.clients_v4[0];
    let sender = spawn_in(&lab.client_ns, move || {
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 0))?;
        let start = Instant::now();
        let mut sent = HashMap::new();
        for i in 0..FLOWS {
            let due = start + PACE * u32::from(i);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let port = FIRST_DST_PORT + i;
            sent.insert(port, SystemTime::now());
            sock.send_to(b"crash", SocketAddr::new(IpAddr::V4(SERVER_V4), port))?;
        }
        Ok(sent)
    })?;
    std::thread::sleep(PACE * u32::from(FLOWS) / 2);
    let killed_at = SystemTime::now();
    drop(agent); // SIGKILL, then reaped
    let sent = sender.join().expect("sender thread")?;
    // The flows end while no agent listens; the restart's dump must not find them, so what
    // the trail holds of them is what the first run committed.
    lab.gw_sh(&["conntrack", "-F"])?;

    let again = AgentProcess::start(bin, &lab.gw_ns, &cfg, &db, &dir.join("second.log"))?;
    std::thread::sleep(Duration::from_millis(1_500));
    again.stop()?;

    let conn = open_ro(&db)?;
    let gaps: Vec<(i64, i64, Option<u64>)> = conn
        .prepare(
            "SELECT epoch_us(start), epoch_us(\"end\"), lost FROM capture_gaps WHERE source = 'restart'",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    ensure!(gaps.len() == 1, "restart gaps: {gaps:?}");
    let (gap_start, gap_end, lost) = gaps[0];
    let us = |t: SystemTime| DateTime::<Utc>::from(t).timestamp_micros();
    let killed_us = us(killed_at);
    ensure!(
        lost.is_none(),
        "the count of what a killed run lost is unknown"
    );
    ensure!(
        gap_start <= killed_us && killed_us - gap_start <= (COMMIT.as_micros() as i64) * 3 / 2,
        "the gap starts {} ms before the kill: more than the last commit interval",
        (killed_us - gap_start) / 1_000
    );

    let rows = flows(
        &conn,
        &FlowsQuery {
            internal_ip: Some(IpAddr::V4(client)),
            proto: Some(Proto::Udp),
            limit: 100_000,
            ..Default::default()
        },
    )?;
    let stored: HashMap<u16, _> = rows
        .iter()
        .filter_map(|f| f.dst_port.map(|p| (p, f)))
        .filter(|(p, _)| (FIRST_DST_PORT..FIRST_DST_PORT + FLOWS).contains(p))
        .collect();
    // In the pipeline when the last commit ran: the reader's and the writer's batching.
    let in_flight_us = 200_000;
    let (mut before, mut lost_flows) = (0, Vec::new());
    for (&port, &t) in &sent {
        let t_us = us(t);
        if t_us >= killed_us {
            continue;
        }
        match stored.get(&port) {
            Some(f) => {
                ensure!(
                    f.public_ip == GW_PUBLIC_V4.to_string(),
                    "flow to {port}: {f:?}"
                );
                before += 1;
            }
            None => {
                ensure!(
                    t_us >= gap_start - in_flight_us,
                    "flow to {port} sent {} ms before the last commit is missing",
                    (gap_start - t_us) / 1_000
                );
                lost_flows.push((port, t));
            }
        }
    }
    ensure!(before > 1_000, "only {before} flows stored before the kill");
    // An instant inside the recorded gap: `who` says the trail is incomplete there, naming
    // the gap. (One client socket: the NAT gave all its flows one public port.)
    let public = stored.values().next().map(|f| f.public_port).unwrap_or(0);
    let inside = gap_start + (gap_end - gap_start) / 2;
    let a = who(
        &conn,
        &WhoQuery {
            ip: IpAddr::V4(GW_PUBLIC_V4),
            port: public,
            at: DateTime::<Utc>::from_timestamp_micros(inside).expect("instant"),
            tolerance: Duration::ZERO,
            proto: Some(Proto::Udp),
            dst_ip: None,
            dst_port: None,
            live: false,
        },
    )?;
    ensure!(
        a.status == WhoStatus::Incomplete
            && a.holes.iter().any(|h| h.kind == HoleKind::Gap
                && h.source.as_deref() == Some("restart")
                && h.contains(inside)),
        "inside the gap: {:?} with holes {:?}",
        a.status,
        a.holes
    );
    println!(
        "killed {} ms after the last commit; {before} flows sent before the kill stored, {} lost \
         (all sent after {} ms before that commit); gap {} ms long",
        (killed_us - gap_start) / 1_000,
        lost_flows.len(),
        in_flight_us / 1_000,
        (gap_end - gap_start) / 1_000
    );
    Ok(())
}
