//! `cargo xtask bench steady|burst`: the agent's CPU per conntrack event on the real kernel
//! path (netlink, the reader, the stage, the writer, DuckDB), in the lab's gateway namespace.
//!
//! - `steady`: idle first (no traffic), then 463 new UDP flows a second (926 events: NEW and
//!   DESTROY, the flows expire after the lab's 1 s UDP timeout) — eduroam's average rate.
//! - `burst`: 250,000 new flows as fast as the kernel takes them; every flow must be stored.
//!
//! The kernel reaps expired entries (and sends their DESTROY) when its garbage collector gets
//! to them, which in the lab can lag by tens of seconds; a busy gateway's collector, and
//! here a table dump every 250 ms by `conntrack -L`, reap them on time.
//!
//! CPU is the agent's, from `/proc/<pid>/task/*/schedstat` (nanoseconds on a CPU, summed over
//! its threads). Each figure is the median of `RUNS` runs. With `NATTRAIL_BEFORE=<binary>`,
//! that build is measured in the same run, alternating with this one, and the ratio printed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, ensure};
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::netns::{run_in, spawn_in};
use nattrail_lab::scratch::Scratch;
use nattrail_lab::{LabOptions, NatLab, SERVER_V4};

const RUNS: usize = 3;
const STEADY_FLOWS_PER_SEC: f64 = 463.0;
const WINDOW: Duration = Duration::from_secs(20);
const BURST_FLOWS: u32 = 250_000;

fn agent_cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = std::fs::read_to_string(t?.path().join("schedstat")).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// (events decoded, rows committed) from the agent's status snapshot (rewritten each second).
fn counters(db: &Path) -> Result<(u64, u64)> {
    let mut p = db.as_os_str().to_os_string();
    p.push(".status.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)?;
    let get = |s: &str, k: &str| {
        v[s][k]
            .as_u64()
            .with_context(|| format!("no {s}.{k} in the status snapshot: {v}"))
    };
    Ok((get("conntrack", "decoded")?, get("writer", "rows")?))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Two sockets per client address: 8 sources × 60,000 destination ports of distinct flows.
fn client_sockets(clients: &[Ipv4Addr]) -> Result<Vec<UdpSocket>> {
    let mut socks = Vec::new();
    for c in clients {
        for _ in 0..2 {
            socks.push(UdpSocket::bind(SocketAddr::new(IpAddr::V4(*c), 0))?);
        }
    }
    Ok(socks)
}

/// Sends flow `i` of a stream of distinct UDP flows.
fn send_flow(socks: &[UdpSocket], i: u32) -> Result<()> {
    let s = &socks[i as usize % socks.len()];
    let port = 2_000 + (i / socks.len() as u32) % 60_000;
    s.send_to(
        b"x",
        SocketAddr::new(IpAddr::V4(SERVER_V4), u16::try_from(port)?),
    )?;
    Ok(())
}

struct Agent {
    proc: AgentProcess,
    db: PathBuf,
    _dir: Scratch,
}

fn start(bin: &Path, lab: &NatLab, tag: &str) -> Result<Agent> {
    let dir = Scratch::new(&format!("bench-live-{tag}"))?;
    let (cfg, db) = (dir.join("agent.toml"), dir.join("trail.duckdb"));
    std::fs::write(
        &cfg,
        format!(
            "[docker]\nenabled = false\n[api]\nlisten = \"\"\nsocket = \"{}\"\n",
            dir.join("run/api.sock").display()
        ),
    )?;
    let proc = AgentProcess::start(bin, &lab.gw_ns, &cfg, &db, &dir.join("agent.log"))?;
    Ok(Agent {
        proc,
        db,
        _dir: dir,
    })
}

/// Dumps the gateway's table every 250 ms until `stop` is set: expired entries are reaped
/// (and their DESTROY sent) on time.
fn reaper(lab: &NatLab, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ns = lab.gw_ns.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "conntrack", "-L"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(250));
        }
    })
}

/// Percent of a core over `WINDOW` with no traffic.
fn idle(a: &Agent) -> Result<f64> {
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (agent_cpu_ns(a.proc.pid())?, Instant::now());
    std::thread::sleep(WINDOW);
    let (c1, t1) = (agent_cpu_ns(a.proc.pid())?, Instant::now());
    Ok((c1 - c0) as f64 / (t1 - t0).as_nanos() as f64 * 100.0)
}

/// (percent of a core, events/s, µs per event) at the steady rate.
fn steady(a: &Agent, lab: &NatLab) -> Result<(f64, f64, f64)> {
    let total = Duration::from_secs(5) + WINDOW + Duration::from_secs(1);
    let generator = spawn_in(&lab.client_ns, {
        let clients = lab.clients_v4.clone();
        move || -> Result<u32> {
            let socks = client_sockets(&clients)?;
            let start = Instant::now();
            let mut sent = 0u32;
            while start.elapsed() < total {
                let due = (start.elapsed().as_secs_f64() * STEADY_FLOWS_PER_SEC) as u32;
                while sent < due {
                    send_flow(&socks, sent)?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(sent)
        }
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let reaping = reaper(lab, Arc::clone(&stop));
    // Warm-up: the first flows' DESTROY events start after the 1 s timeout.
    std::thread::sleep(Duration::from_secs(5));
    let (c0, e0, t0) = (
        agent_cpu_ns(a.proc.pid())?,
        counters(&a.db)?.0,
        Instant::now(),
    );
    std::thread::sleep(WINDOW);
    let (c1, e1, t1) = (
        agent_cpu_ns(a.proc.pid())?,
        counters(&a.db)?.0,
        Instant::now(),
    );
    let sent = generator.join().expect("generator")?;
    stop.store(true, Ordering::Relaxed);
    let _ = reaping.join();
    ensure!(sent > 0, "no flows sent");
    let secs = (t1 - t0).as_secs_f64();
    let events = (e1 - e0) as f64;
    Ok((
        (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64 * 100.0,
        events / secs,
        (c1 - c0) as f64 / 1_000.0 / events.max(1.0),
    ))
}

/// (flows/s sent, events, CPU s, µs per event, percent of a core while busy).
fn burst(a: &Agent, lab: &NatLab) -> Result<(f64, u64, f64, f64, f64)> {
    let (_, rows0) = counters(&a.db)?;
    let gaps0 = gaps(a)?;
    let (c0, t0) = (agent_cpu_ns(a.proc.pid())?, Instant::now());
    // New sockets, new source ports: distinct from earlier runs' flows.
    let sent_for = run_in(&lab.client_ns, {
        let clients = lab.clients_v4.clone();
        move || -> Result<Duration> {
            let socks = client_sockets(&clients)?;
            let t = Instant::now();
            for i in 0..BURST_FLOWS {
                send_flow(&socks, i)?;
            }
            Ok(t.elapsed())
        }
    })?;
    // Every flow's NEW and DESTROY (after the 1 s timeout) stored, and nothing more coming.
    let stop = Arc::new(AtomicBool::new(false));
    let reaping = reaper(lab, Arc::clone(&stop));
    let want = rows0 + 2 * u64::from(BURST_FLOWS);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (0, Instant::now());
    loop {
        let (ev, rows) = counters(&a.db)?;
        if rows >= want && ev == last.0 && last.1.elapsed() >= Duration::from_secs(2) {
            break;
        }
        if ev != last.0 {
            last = (ev, Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "burst not stored: {rows} rows of {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reaping.join();
    // The window ends when the last event arrived (plus the commit after it).
    let (c1, t1) = (agent_cpu_ns(a.proc.pid())?, last.1);
    let (_, rows1) = counters(&a.db)?;
    ensure!(gaps(a)? == gaps0, "a capture gap during the burst");
    ensure!(
        rows1 - rows0 == 2 * u64::from(BURST_FLOWS),
        "stored {} rows for {BURST_FLOWS} flows",
        rows1 - rows0
    );
    let events = rows1 - rows0;
    let cpu = (c1 - c0) as f64 / 1e9;
    Ok((
        f64::from(BURST_FLOWS) / sent_for.as_secs_f64(),
        events,
        cpu,
        cpu * 1e6 / events as f64,
        cpu / (t1 - t0).as_secs_f64() * 100.0,
    ))
}

fn gaps(a: &Agent) -> Result<u64> {
    let mut p = a.db.as_os_str().to_os_string();
    p.push(".status.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)?;
    v["writer"]["gaps"]
        .as_u64()
        .context("no writer.gaps in the status snapshot")
}

fn main() -> Result<()> {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a == "steady" || a == "burst")
        .collect();
    ensure!(which.len() == 1, "say `steady` or `burst`");
    let mut builds = vec![("this build", PathBuf::from(env!("CARGO_BIN_EXE_nattrail")))];
    if let Some(b) = std::env::var_os("NATTRAIL_BEFORE") {
        builds.insert(0, ("before", PathBuf::from(b)));
    }
    let lab = NatLab::create(LabOptions {
        clients: 4,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    // Per build, three series: idle %, busy % and µs per event (steady), or µs per event,
    // CPU-s and busy % (burst).
    let mut rows: Vec<Series> = builds
        .iter()
        .map(|(n, _)| Series {
            name: n,
            v: [vec![], vec![], vec![]],
        })
        .collect();
    for run in 0..RUNS {
        for (k, (name, bin)) in builds.iter().enumerate() {
            let a = start(bin, &lab, &format!("{name}-{run}").replace(' ', "-"))?;
            if which[0] == "steady" {
                let idle = idle(&a)?;
                let (busy, rate, per) = steady(&a, &lab)?;
                println!(
                    "{name} run {run}: idle {idle:.3}% of a core; steady {rate:.0} events/s: {busy:.3}% of a core, {per:.1} µs per event"
                );
                rows[k].push([idle, busy, per]);
            } else {
                let (fps, events, cpu, per, busy) = burst(&a, &lab)?;
                println!(
                    "{name} run {run}: {BURST_FLOWS} flows at {fps:.0} flows/s, {events} events stored, no gap; {cpu:.2} CPU-s, {per:.2} µs per event, {busy:.0}% of a core"
                );
                rows[k].push([per, cpu, busy]);
            }
            a.proc.stop()?;
            // Let the last flows expire before the next agent dumps the table.
            lab.wait_conntrack_at_most(0, Duration::from_secs(60))?;
        }
    }
    println!("medians of {RUNS} runs:");
    for r in &rows {
        let [a, b, c] = r.medians();
        if which[0] == "steady" {
            println!(
                "  {}: idle {a:.3}% of a core; at 926 events/s {b:.3}% of a core ({c:.1} µs per event)",
                r.name
            );
        } else {
            println!(
                "  {}: {a:.2} µs per event, {b:.2} CPU-s, {c:.0}% of a core",
                r.name
            );
        }
    }
    if let [before, this] = &rows[..] {
        let (b, t) = (before.medians(), this.medians());
        println!(
            "  ratio this/before: {:.2} / {:.2} / {:.2}",
            t[0] / b[0],
            t[1] / b[1],
            t[2] / b[2]
        );
    }
    Ok(())
}

/// One build's figures, run by run.
struct Series {
    name: &'static str,
    v: [Vec<f64>; 3],
}

impl Series {
    fn push(&mut self, x: [f64; 3]) {
        for (v, x) in self.v.iter_mut().zip(x) {
            v.push(x);
        }
    }

    fn medians(&self) -> [f64; 3] {
        [
            median(self.v[0].clone()),
            median(self.v[1].clone()),
            median(self.v[2].clone()),
        ]
    }
}
