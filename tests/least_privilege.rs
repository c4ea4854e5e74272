//! The agent as an unprivileged user holding only CAP_NET_ADMIN (plus the Docker socket's
//! group), under `setpriv` in the lab's gateway namespace: the conntrack trail answers `who`,
//! the API serves, and a log rule fires on a real container. Needs root, dockerd (started if
//! absent) and the busybox image.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nattrail_lab::agent::{AgentProcess, cli};
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::{Server, alternating, make_flows};
use nattrail_lab::{LabOptions, NatLab, SERVER_V4, docker, sh};
use serde_json::Value;

const USER: &str = "nattrail-lp";
/// CAP_NET_ADMIN is capability 12.
const NET_ADMIN_ONLY: &str = "0000000000001000";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

/// The test's system user, created once: (uid, gid).
fn user() -> Result<(u32, u32)> {
    if sh(&["id", "-u", USER]).is_err() {
        sh(&[
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ])?;
    }
    let uid = sh(&["id", "-u", USER])?.trim().parse()?;
    let gid = sh(&["id", "-g", USER])?.trim().parse()?;
    Ok((uid, gid))
}

/// A field of /proc/<pid>/status.
fn status_field(pid: u32, field: &str) -> Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_agent_with_only_cap_net_admin_keeps_the_trail_and_the_log_scanner() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    let (uid, gid) = user()?;
    let docker_gid = std::fs::metadata("/var/run/docker.sock")?.gid();
    let lab = NatLab::create(LabOptions {
        clients: 2,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[9300], 100)?;
    let dir = Scratch::new("least-priv")?;
    let state = dir.join("state");
    std::fs::create_dir(&state)?;
    std::os::unix::fs::chown(&state, Some(uid), Some(gid))?;
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let (db, cfg) = (state.join("trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        "[store]\ncommit_interval_ms = 100\n[api]\nlisten = \"127.0.0.1:7466\"\n",
    )?;
    // The kernel settings are the package's job (sysctl.d) when the agent is not root: an
    // unprivileged process may not write /proc/sys.
    for s in ["events", "acct", "timestamp"] {
        lab.gw_sh(&[
            "sysctl",
            "-qw",
            &format!("net.netfilter.nf_conntrack_{s}=1"),
        ])?;
    }
    let (uid_s, gid_s, groups) = (uid.to_string(), gid.to_string(), docker_gid.to_string());
    let wrapper = [
        "setpriv",
        "--reuid",
        &uid_s,
        "--regid",
        &gid_s,
        "--groups",
        &groups,
        "--inh-caps=-all,+net_admin",
        "--ambient-caps=-all,+net_admin",
        "--bounding-set=-all,+net_admin",
        "--no-new-privs",
    ];
    let log = dir.join("agent.log");
    let mut agent = AgentProcess::start_wrapped(&bin(), &lab.gw_ns, &wrapper, &cfg, &db, &log)?;
    agent.wait_for_log("dockerd reached", Duration::from_secs(30))?;
    let pid = agent.pid();
    ensure!(
        status_field(pid, "Uid")?
            .split_whitespace()
            .all(|u| u == uid_s),
        "Uid: {}",
        status_field(pid, "Uid")?
    );
    for f in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        let v = status_field(pid, f)?;
        ensure!(v == NET_ADMIN_ONLY, "{f}: {v}, want {NET_ADMIN_ONLY}");
    }
    let run = |args: &[&str]| cli(&bin(), Some(&lab.gw_ns), &cfg, &db, args);

    // A log rule fires on a container (the CLI as root through the agent's API: the listener
    // belongs to the agent's user, who owns the token file).
    let out = run(&[
        "rules",
        "add",
        "--name",
        "lp",
        "--pattern",
        r"LP-ERROR (?P<n>\d+)",
    ])?;
    ensure!(out.contains("added"), "{out}");
    let name = "ntl-lp-web";
    docker::run(name, false, "echo 'LP-ERROR 42'; sleep 1")?;
    let hits = || -> Result<Value> {
        let out = run(&[
            "sql",
            "--json",
            "SELECT metadata->>'container', metadata->'captures'->>'n' FROM event_log \
             WHERE source = 'logscan' ORDER BY id",
        ])?;
        Ok(serde_json::from_str::<Value>(&out)?["rows"].clone())
    };
    wait_until("the log rule's hit", Duration::from_secs(30), || {
        Ok(hits()?.as_array().is_some_and(|r| !r.is_empty()))
    })?;
    let _ = sh(&["docker", "rm", "-f", name]);
    ensure!(
        hits()? == serde_json::json!([[name, "42"]]),
        "hits: {}",
        hits()?
    );

    // A NAT flow is found by `who`.
    let specs = alternating(&lab, &server, 4, "lp");
    let done = make_flows(&lab.client_ns, specs, 2)?;
    lab.wait_snat_flows_at_most(0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    for d in &done {
        let seen = server.seen(&d.spec.token).context("flow not seen")?;
        let at = chrono::DateTime::<chrono::Utc>::from(d.inside()).to_rfc3339();
        let port = seen.peer.port().to_string();
        let out = run(&[
            "who",
            "--ip",
            "198.51.100.1",
            "--port",
            &port,
            "--at",
            &at,
            "--tolerance",
            "0s",
            "--proto",
            d.spec.transport.name(),
            "--json",
        ])?;
        let who: Value = serde_json::from_str(&out)?;
        ensure!(
            who["status"] == "found"
                && who["matches"][0]["internal_port"] == d.local.port()
                && who["matches"][0]["internal_ip"] == d.spec.client.to_string(),
            "who for {}: {who}",
            d.spec.token
        );
    }
    ensure!(
        std::fs::metadata(&db)?.uid() == uid,
        "the trail belongs to the agent's user"
    );
    // Without CAP_BPF the eBPF programs are refused; status says so and why, and the
    // trail and the scanner above ran regardless.
    let status: Value = serde_json::from_str(&run(&["status", "--json"])?)?;
    let ebpf = &status["agent"]["ebpf"];
    ensure!(
        ebpf["running"] == false
            && ebpf["error"]
                .as_str()
                .is_some_and(|e| e.contains("nattrail_exec") || e.contains("loading")),
        "eBPF in status: {ebpf}"
    );
    ensure!(
        agent
            .log_text()
            .contains("eBPF program not loaded: process executions are not recorded"),
        "one clear line in the log"
    );
    ensure!(agent.stop()?.success(), "agent exit");
    server.stop()?;
    Ok(())
}
