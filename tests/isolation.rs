//! Isolation between sources: containers flood the writer with rule hits as fast as the scan
//! workers produce them (the token bucket raised so that every hit is kept), and meanwhile a
//! 20,000-flow conntrack burst through the lab's NAT is stored without loss.
//!
//! `NATTRAIL_BIN=<binary>` runs another build, and `ISOLATION_FLOOD_PER_SEC=<lines/s>` paces
//! the flood (all containers together) instead of running it flat out: together they measure
//! an older build's margin. The figures are printed either way.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::docker;
use nattrail_lab::netns::run_in;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::{LabOptions, NatLab, SERVER_V4};

const BURST: u16 = 20_000;
const FIRST_DST_PORT: u16 = 20_000;
const FLOODERS: usize = 4;
/// Lines per flooding container: enough to outlast the burst and its storage.
const FLOOD_LINES: u32 = 400_000;
const PREFIX: &str = "ntl-iso";

fn bin() -> PathBuf {
    std::env::var_os("NATTRAIL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nattrail")))
}

/// The agent's status snapshot (rewritten each second).
fn status(db: &Path) -> Result<serde_json::Value> {
    let mut p = db.as_os_str().to_os_string();
    p.push(".status.json");
    Ok(serde_json::from_slice(&std::fs::read(&p)?)?)
}

fn events_written(db: &Path) -> Result<u64> {
    status(db)?["writer"]["events"]
        .as_u64()
        .context("writer.events in the status snapshot")
}

fn remove_flooders() {
    for i in 0..FLOODERS {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &format!("{PREFIX}-{i}")])
            .output();
    }
}

#[test]
fn a_flood_of_log_hits_costs_no_conntrack_event() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    remove_flooders();
    let lab = NatLab::create(LabOptions {
        clients: 1,
        nat_ports: None,
        ipv6: false,
        // The default 30 s UDP timeout: the burst's flows stay alive while it is checked.
        short_timeouts: false,
    })?;
    let dir = Scratch::new("isolation")?;
    let (cfg, db) = (dir.join("agent.toml"), dir.join("trail.duckdb"));
    std::fs::write(
        &cfg,
        format!(
            "[api]\nlisten = \"\"\nsocket = \"{}\"\n\
             [docker]\nhits_per_sec = 1000000000\nhits_burst = 1000000000\n",
            dir.join("run/api.sock").display()
        ),
    )?;
    nattrail_lab::agent::cli(
        &bin(),
        None,
        &cfg,
        &db,
        &["rules", "add", "--name", "flood", "--pattern", "FLOOD"],
    )?;
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("agent.log"))?;
    let result = (|| -> Result<()> {
        let paced: Option<u32> = std::env::var("ISOLATION_FLOOD_PER_SEC")
            .ok()
            .map(|v| v.parse())
            .transpose()?;
        for i in 0..FLOODERS {
            let script = match paced {
                None => format!("yes FLOOD-{i}-0123456789 | head -n {FLOOD_LINES}"),
                // A block of lines every 50 ms.
                Some(rate) => format!(
                    "while :; do yes FLOOD-{i}-0123456789 | head -n {}; usleep 50000; done",
                    (rate / 20 / FLOODERS as u32).max(1)
                ),
            };
            docker::run(&format!("{PREFIX}-{i}"), false, &script)?;
        }
        // The flood is under way once hits are being written.
        let deadline = Instant::now() + Duration::from_secs(60);
        while events_written(&db)? < 5_000 {
            ensure!(
                Instant::now() < deadline,
                "the flood never reached the writer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The flood's own rate, before the burst.
        let (f0, ft) = (events_written(&db)?, Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let flood_rate = (events_written(&db)? - f0) as f64 / ft.elapsed().as_secs_f64();
        let (e0, t0) = (events_written(&db)?, Instant::now());
        let client = lab.clients_v4[0];
        run_in(&lab.client_ns, move || {
            let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 0))?;
            for i in 0..BURST {
                sock.send_to(
                    b"burst",
                    SocketAddr::new(IpAddr::V4(SERVER_V4), FIRST_DST_PORT + i),
                )?;
            }
            Ok(())
        })?;
        let burst_sent = t0.elapsed();
        // Stored, or lost: wait until the burst's stage is empty and a commit has passed.
        std::thread::sleep(Duration::from_secs(3));
        let (e1, t1) = (events_written(&db)?, Instant::now());
        let rate = (e1 - e0) as f64 / (t1 - t0).as_secs_f64();
        let st = status(&db)?;
        let stage = |name: &str| {
            st["stages"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == name))
                .cloned()
                .unwrap_or_default()
        };
        let out = nattrail_lab::agent::cli(
            &bin(),
            Some(&lab.gw_ns),
            &cfg,
            &db,
            &[
                "sql",
                "--json",
                &format!(
                    "SELECT (SELECT count(*) FROM conntrack_events WHERE kind = 1 \
                       AND orig_dport BETWEEN {FIRST_DST_PORT} AND {}), \
                     (SELECT count(*) FROM capture_gaps)",
                    FIRST_DST_PORT + BURST - 1
                ),
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let (stored, gaps) = (
            v["rows"][0][0].as_u64().context("stored count")?,
            v["rows"][0][1].as_u64().context("gap count")?,
        );
        println!(
            "hits written at {flood_rate:.0}/s before the burst, {rate:.0}/s over the {:.1} s \
             from its start (sent in {} ms); conntrack burst: {stored} of {BURST} flows \
             stored, {gaps} capture gaps; stages: {} / {}",
            (t1 - t0).as_secs_f64(),
            burst_sent.as_millis(),
            stage("conntrack->writer"),
            stage("logs->writer"),
        );
        // The flood was really on: hits were written all through the burst's window.
        ensure!(
            rate > 1_000.0,
            "only {rate:.0} hits/s: the writer was not flooded"
        );
        ensure!(
            (stored, gaps) == (u64::from(BURST), 0),
            "{stored} of {BURST} flows stored, {gaps} gaps"
        );
        Ok(())
    })();
    remove_flooders();
    let st = agent.stop();
    result?;
    ensure!(st?.success(), "agent exit");
    Ok(())
}
