//! `cargo xtask`: the demo, the full test run, benchmarks and the lab by hand.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nattrail_lab::agent::{AgentProcess, built_binary};
use nattrail_lab::traffic::{FlowSpec, Server, Transport, make_flows, open_tcp};
use nattrail_lab::{GW_PUBLIC_V4, LabOptions, NatLab, SERVER_V4, packages};

/// Default build directory, shared by every clone: DuckDB's C++ build takes 25+ minutes.
const DEFAULT_TARGET_DIR: &str = "/var/tmp/nattrail-target";

#[derive(Parser)]
#[command(name = "xtask")]
struct Xtask {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, make a NAT lab, run the agent, make connections and answer one `who`.
    Demo,
    /// Install what the tests need and run every test.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `ingest`, `scan`, `open-flows`, `alert`, `steady`, `burst`, `trail`.
    Bench {
        /// Which benchmark.
        name: String,
    },
    /// Build the release binary and the .deb (cargo-deb; installed when missing); prints
    /// the .deb's path.
    Deb {
        /// Debian version (default: the crate's version, revision 1).
        #[arg(long)]
        version: Option<String>,
        /// Directory for the .deb (default: <target dir>/debian).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Capture a fresh conntrack fixture from the lab into tests/fixtures/.
    CaptureFixture,
    /// Write a synthetic trail through the agent's writer, and its ground-truth lookups
    /// (`<out>.cases.jsonl`).
    GenTrail {
        /// Flows in all.
        #[arg(long, default_value_t = 1_000_000)]
        flows: u64,
        /// Days they span.
        #[arg(long, default_value_t = 1)]
        days: u32,
        /// The database to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Long campaign of the hostile-bytes property tests (Docker frames, log lines,
    /// ctnetlink datagrams, config text); prints cases/s per target.
    Fuzz {
        /// Cases per target.
        #[arg(long, default_value_t = 10_000_000)]
        cases: u64,
        /// Base seed (default: from the clock; printed, so a failure can be replayed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> Result<()> {
    let x = Xtask::parse();
    let root = workspace_root();
    // SAFETY: single-threaded at this point; set before spawning anything.
    if std::env::var_os("CARGO_TARGET_DIR").is_none() {
        unsafe { std::env::set_var("CARGO_TARGET_DIR", DEFAULT_TARGET_DIR) };
    }
    match x.cmd {
        Cmd::Demo => demo(&root),
        Cmd::Test { args } => test(&root, &args),
        Cmd::Bench { name } => bench(&root, &name),
        Cmd::GenTrail { flows, days, out } => {
            let out = std::path::absolute(&out).context("the output path")?;
            cargo(
                &root,
                &[
                    "run",
                    "--release",
                    "-p",
                    "nattrail",
                    "--example",
                    "gen_trail",
                    "--",
                    "--flows",
                    &flows.to_string(),
                    "--days",
                    &days.to_string(),
                    "--out",
                    &out.display().to_string(),
                ],
            )
        }
        Cmd::Deb { version, out } => deb(&root, version.as_deref(), out),
        Cmd::CaptureFixture => capture_fixture(&root),
        Cmd::Fuzz { cases, seed } => fuzz(&root, cases, seed),
    }
}

fn deb(root: &Path, version: Option<&str>, out: Option<PathBuf>) -> Result<()> {
    cargo(
        root,
        &["build", "--release", "-p", "nattrail", "--bin", "nattrail"],
    )?;
    let target = PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").context("target dir")?);
    let out = match out {
        Some(o) => std::path::absolute(o).context("the output directory")?,
        None => target.join("debian"),
    };
    let deb = nattrail_lab::package::build_deb(root, &target, &built_binary(), version, &out)?;
    println!("{}", deb.display());
    Ok(())
}

fn workspace_root() -> PathBuf {
    // `cargo run` sets the variable at run time too: prefer it, so a binary built from
    // another clone sharing the target directory still works on this tree.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(())
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root: the lab creates network namespaces and NAT rules");
    }
    Ok(())
}

/// Mounts what the kernel-facing tests need, when absent.
fn prepare_host() -> Result<()> {
    for (fs, target) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(target));
        if !mounted && Path::new(target).exists() {
            let _ = Command::new("mount").args(["-t", fs, fs, target]).status();
        }
    }
    // The Docker tests and the demo need a dockerd and the busybox image.
    nattrail_lab::docker::ensure_dockerd()?;
    nattrail_lab::docker::ensure_image()?;
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    require_root()?;
    packages::ensure(packages::NEEDED)?;
    prepare_host()?;
    let mut args = vec!["test", "--release", "--workspace"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(root, &args)?;
    if extra.is_empty() {
        contracts(root)?;
    }
    Ok(())
}

/// Real clients accept our published contracts: the OpenAPI document validates with
/// openapi-spec-validator (from PyPI, installed when missing).
fn contracts(root: &Path) -> Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "openapi-spec-validator"])
            .status()
            .context("running pip")?;
        if !st.success() {
            bail!("pip install openapi-spec-validator failed ({st})");
        }
    }
    let doc = root.join("schemas/api/openapi.json");
    eprintln!("+ python3 -m openapi_spec_validator {}", doc.display());
    let st = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&doc)
        .status()
        .context("running openapi-spec-validator")?;
    if !st.success() {
        bail!("{} does not validate ({st})", doc.display());
    }
    Ok(())
}

fn bench(root: &Path, name: &str) -> Result<()> {
    match name {
        "ingest" | "scan" => cargo(root, &["bench", "-p", "nattrail", "--bench", name]),
        "open-flows" => cargo(root, &["bench", "-p", "nattrail", "--bench", "open_flows"]),
        "trail" => {
            // The baselines: grep over the text export, and an indexed SQLite table.
            packages::ensure(&["sqlite3", "python3", "grep"])?;
            cargo(root, &["bench", "-p", "nattrail", "--bench", name])
        }
        "ebpf" => {
            require_root()?;
            packages::ensure(packages::NEEDED)?;
            cargo(root, &["bench", "-p", "nattrail", "--bench", name])
        }
        "alert" => {
            require_root()?;
            packages::ensure(packages::NEEDED)?;
            prepare_host()?;
            cargo(root, &["bench", "-p", "nattrail", "--bench", name])
        }
        "steady" | "burst" => {
            require_root()?;
            packages::ensure(packages::NEEDED)?;
            prepare_host()?;
            cargo(
                root,
                &["bench", "-p", "nattrail", "--bench", "live", "--", name],
            )
        }
        other => {
            bail!(
                "unknown benchmark {other:?}; available: ingest, scan, open-flows, ebpf, alert, steady, burst, trail"
            )
        }
    }
}

fn fuzz(root: &Path, cases: u64, seed: Option<u64>) -> Result<()> {
    // A new seed per campaign explores new cases; `cargo test` keeps its fixed one.
    let seed = seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    // Built first and run directly, so that the wall time below is the campaign's alone
    // (a `cargo test` may wait for another build's lock on the shared target directory).
    let build = [
        "test",
        "--release",
        "-p",
        "nattrail",
        "--test",
        "hostile_bytes",
        "--no-run",
        "--message-format=json",
    ];
    eprintln!("+ cargo {}", build.join(" "));
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(build)
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("building the hostile_bytes test failed ({})", out.status);
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let exe = json
        .lines()
        .filter(|l| l.contains(r#""name":"hostile_bytes""#))
        .find_map(|l| l.split(r#""executable":""#).nth(1)?.split('"').next())
        .context("cargo named no hostile_bytes test executable")?;
    eprintln!("+ NATTRAIL_FUZZ_CASES={cases} NATTRAIL_FUZZ_SEED={seed} {exe} --nocapture");
    let start = Instant::now();
    // The targets' own lines report their rates; the harness's capture would hide them.
    let st = Command::new(exe)
        .arg("--nocapture")
        .env("NATTRAIL_FUZZ_CASES", cases.to_string())
        .env("NATTRAIL_FUZZ_SEED", seed.to_string())
        .current_dir(root.join("agent"))
        .status()
        .with_context(|| format!("running {exe}"))?;
    let wall = start.elapsed().as_secs_f64();
    if !st.success() {
        bail!("fuzz campaign failed after {wall:.0} s ({st}); its output names the case to replay");
    }
    println!("fuzz: 4 targets x {cases} cases, seed {seed}, {wall:.0} s wall time");
    Ok(())
}

fn demo(root: &Path) -> Result<()> {
    require_root()?;
    packages::ensure(packages::NEEDED)?;
    prepare_host()?;
    cargo(root, &["build", "--release", "-p", "nattrail"])?;
    let bin = built_binary();

    println!(
        "== building the NAT lab: 6 clients (10.77.0.10-15) -> gateway 198.51.100.1 (MASQUERADE) -> server 198.51.100.2"
    );
    let lab = NatLab::create(LabOptions {
        clients: 6,
        nat_ports: Some((40000, 40009)),
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[80, 443], 512)?;
    let dir = std::env::temp_dir().join(format!("nattrail-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (db, cfg, log) = (
        dir.join("demo.duckdb"),
        dir.join("demo.toml"),
        dir.join("agent.log"),
    );
    std::fs::write(&cfg, "[store]\ncommit_interval_ms = 200\n")?;

    println!("== a log-scan rule for every container");
    show(
        &bin,
        &db,
        &[
            "rules",
            "add",
            "--name",
            "backend-down",
            "--pattern",
            r"ERROR (?P<what>\w+) unreachable",
            "--severity",
            "error",
        ],
    )?;
    println!(
        "== starting the agent in the gateway namespace ({})",
        lab.gw_ns
    );
    let agent = AgentProcess::start(&bin, &lab.gw_ns, &cfg, &db, &log)?;

    println!("== a container that logs trouble on stderr");
    let web = "nattrail-demo-web";
    nattrail_lab::docker::run(
        web,
        false,
        "echo serving; echo 'ERROR payments unreachable' >&2; echo done",
    )?;
    nattrail_lab::docker::wait_exited(web, Duration::from_secs(30))?;

    println!("== 36 short connections (TCP and UDP) and one that stays open");
    let specs: Vec<FlowSpec> = (0..36)
        .map(|i| FlowSpec {
            token: format!("demo-{i}"),
            transport: if i % 3 == 0 {
                Transport::Udp
            } else {
                Transport::Tcp
            },
            client: IpAddr::V4(lab.clients_v4[i % lab.clients_v4.len()]),
            server: SocketAddr::new(IpAddr::V4(SERVER_V4), if i % 2 == 0 { 80 } else { 443 }),
            send_bytes: 200 + 37 * i,
            hold: Duration::from_millis(40),
            client_port: 0,
        })
        .collect();
    let done = make_flows(&lab.client_ns, specs, 4)?;
    let (_open, open_local) = open_tcp(
        &lab.client_ns,
        IpAddr::V4(lab.clients_v4[1]),
        SocketAddr::new(IpAddr::V4(SERVER_V4), 443),
        "demo-open",
    )?;
    std::thread::sleep(Duration::from_millis(300));
    // A moment the agent was watching and the connection was open: asked later, when the
    // agent has stopped, the honest answer is that the trail has a hole there.
    let open_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // Let the short flows expire in the gateway so their DESTROY events arrive.
    lab.wait_conntrack_at_most(1, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    let status = agent.stop()?;
    if !status.success() {
        bail!("agent exited with {status}");
    }
    let _ = Command::new("docker").args(["rm", "-f", web]).output();
    println!("\n== the container's hit in the event log");
    show(
        &bin,
        &db,
        &[
            "sql",
            "SELECT ts, severity, message, metadata->>'container' AS container, \
             metadata->'captures' AS captures FROM event_log WHERE source = 'logscan'",
        ],
    )?;

    let pick = &done[7];
    let seen = server
        .seen(&pick.spec.token)
        .context("the server did not see the demo flow")?;
    let at = chrono::DateTime::<chrono::Utc>::from(pick.inside())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    println!(
        "\n== the report: \"{}:{} at {at} did something bad\" (the client really was {})",
        seen.peer.ip(),
        seen.peer.port(),
        pick.local
    );
    let port = seen.peer.port().to_string();
    let cmd = [
        "who",
        "--ip",
        &GW_PUBLIC_V4.to_string(),
        "--port",
        &port,
        "--at",
        &at,
        "--tolerance",
        "2s",
    ];
    show(&bin, &db, &cmd)?;
    if let Some(seen_open) = server.seen("demo-open") {
        let port = seen_open.peer.port().to_string();
        println!("\n== and the connection still open (client {open_local}):");
        let cmd = [
            "who",
            "--ip",
            &GW_PUBLIC_V4.to_string(),
            "--port",
            &port,
            "--at",
            &open_at,
            "--proto",
            "tcp",
        ];
        show(&bin, &db, &cmd)?;
    }
    server.stop()?;
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    println!("\n== lab torn down");
    Ok(())
}

/// Prints a `nattrail` command line, then runs it so its answer follows.
fn show(bin: &Path, db: &Path, args: &[&str]) -> Result<()> {
    println!("$ nattrail --db {} {}", db.display(), args.join(" "));
    let st = Command::new(bin).arg("--db").arg(db).args(args).status()?;
    if !st.success() {
        bail!("nattrail {} failed ({st})", args.join(" "));
    }
    Ok(())
}

fn capture_fixture(root: &Path) -> Result<()> {
    require_root()?;
    cargo(root, &["build", "--release", "-p", "nattrail"])?;
    let bin = built_binary();
    let lab = NatLab::create(LabOptions {
        clients: 8,
        nat_ports: Some((40000, 40019)),
        ipv6: true,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[80, 443], 300)?;
    let server6 = Server::start(
        &lab.server_ns,
        IpAddr::V6(nattrail_lab::SERVER_V6),
        &[80],
        300,
    )?;
    for k in ["events", "acct", "timestamp"] {
        lab.gw_sh(&[
            "sysctl",
            "-qw",
            &format!("net.netfilter.nf_conntrack_{k}=1"),
        ])?;
    }
    let out = root.join("tests/fixtures/conntrack-lab.bin");
    std::fs::create_dir_all(out.parent().unwrap())?;
    let mut cap = Command::new("ip")
        .args(["netns", "exec", &lab.gw_ns])
        .arg(&bin)
        .args(["capture", "--duration", "45s", "--out"])
        .arg(&out)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let mut specs = Vec::new();
    for i in 0..120usize {
        let v6 = i % 4 == 3;
        specs.push(FlowSpec {
            token: format!("fx-{i}"),
            transport: if i % 2 == 0 {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            client: if v6 {
                IpAddr::V6(lab.clients_v6[i % lab.clients_v6.len()])
            } else {
                IpAddr::V4(lab.clients_v4[i % lab.clients_v4.len()])
            },
            server: if v6 {
                SocketAddr::new(IpAddr::V6(nattrail_lab::SERVER_V6), 80)
            } else {
                SocketAddr::new(IpAddr::V4(SERVER_V4), if i % 3 == 0 { 80 } else { 443 })
            },
            send_bytes: 100 + i * 13,
            hold: Duration::from_millis(10),
            client_port: 0,
        });
    }
    make_flows(&lab.client_ns, specs, 4)?;
    // ICMP echo through the NAT, so the fixture has ICMP ids.
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client_ns,
            "busybox",
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            &SERVER_V4.to_string(),
        ])
        .output();
    // Unanswered SYNs linger (120 s); the capture ends on its own clock anyway.
    let _ = lab.wait_conntrack_at_most(0, Duration::from_secs(30));
    let st = cap.wait()?;
    if !st.success() {
        bail!("capture failed ({st})");
    }
    server.stop()?;
    server6.stop()?;
    println!("fixture written to {}", out.display());
    Ok(())
}
