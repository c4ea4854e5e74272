//! Triggers end to end, with the agent in the lab's gateway namespace and the webhook
//! receiver on that namespace's 127.0.0.1 (allowlisted): a container's log line, a
//! connection to a watched destination through the NAT, and a capture gap each arrive as one
//! signed webhook the test verifies with its own HMAC code.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::docker;
use nattrail_lab::netns::{run_in, spawn_in};
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::{FlowSpec, Server, Transport, make_flows};
use nattrail_lab::{GW_PUBLIC_V4, LabOptions, NatLab, SERVER_V4};
use sha2::Sha256;

const SECRET_B64: &str = "dHJpZ2dlcnMtdGVzdC1rZXk=";

/// (headers webhook-id, timestamp, signature; body).
type Got = Arc<Mutex<Vec<(String, String, String, serde_json::Value)>>>;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

/// The receiver, on 127.0.0.1 inside `ns`; returns its port.
fn receiver(ns: &str, got: Got) -> Result<u16> {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let app = Router::new()
                .route(
                    "/hook",
                    post(|State(g): State<Got>, h: HeaderMap, b: Bytes| async move {
                        let s = |k: &str| {
                            h.get(k)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        let body = serde_json::from_slice(&b).unwrap_or_default();
                        g.lock().unwrap().push((
                            s("webhook-id"),
                            s("webhook-timestamp"),
                            s("webhook-signature"),
                            body,
                        ));
                        // The raw bytes are what was signed: keep them checkable.
                        let ok = verify(
                            &s("webhook-id"),
                            &s("webhook-timestamp"),
                            &b,
                            &s("webhook-signature"),
                        );
                        if ok {
                            axum::http::StatusCode::OK
                        } else {
                            axum::http::StatusCode::UNAUTHORIZED
                        }
                    }),
                )
                .with_state(got);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            tx.send(l.local_addr()?.port())?;
            axum::serve(l, app).await?;
            Ok(())
        })
    })?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("receiver did not start")
}

/// The receiver's own check of a Standard Webhooks signature.
fn verify(id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET_B64)
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header.split(' ').any(|s| s == format!("v1,{want}"))
}

fn cli(ns: &str, cfg: &Path, db: &Path, args: &[&str]) -> Result<String> {
    nattrail_lab::agent::cli(&bin(), Some(ns), cfg, db, args)
}

/// Waits for a webhook whose body passes `pred`.
fn wait_for(
    got: &Got,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<(String, String, String, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(w) = got.lock().unwrap().iter().find(|w| pred(&w.3)) {
            return Ok(w.clone());
        }
        if Instant::now() > deadline {
            bail!("no webhook for {what}; got {:?}", got.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn webhooks_for_a_log_line_a_watched_connection_and_a_capture_gap() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    let lab = NatLab::create(LabOptions {
        clients: 2,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[80, 443], 64)?;
    let got: Got = Arc::default();
    let port = receiver(&lab.gw_ns, Arc::clone(&got))?;
    let url = format!("http://127.0.0.1:{port}/hook");
    let dir = Scratch::new("triggers")?;
    let (db, cfg) = (dir.join("trail.duckdb"), dir.join("agent.toml"));
    // A small socket buffer (64 KiB): the burst at the end overflows it (a capture gap).
    std::fs::write(
        &cfg,
        "[conntrack]\nrcvbuf_bytes = 65536\n[store]\ncommit_interval_ms = 100\n\
         [api]\nlisten = \"127.0.0.1:7483\"\n[webhooks]\nallow = [\"127.0.0.1/32\"]\n",
    )?;
    let secret = format!("whsec_{SECRET_B64}");
    let ns = lab.gw_ns.clone();
    cli(
        &ns,
        &cfg,
        &db,
        &[
            "rules",
            "add",
            "--name",
            "boom",
            "--pattern",
            r"BOOM (?P<n>\d+)",
            "--severity",
            "error",
        ],
    )?;
    for (name, extra) in [
        ("logs", &["--source", "logscan", "--severity", "error"][..]),
        (
            "watched",
            &[
                "--source",
                "conntrack",
                "--dst",
                "198.51.100.2/32",
                "--dst-port",
                "443",
            ][..],
        ),
        ("gaps", &["--source", "agent"][..]),
    ] {
        let mut args = vec![
            "triggers", "add", "--name", name, "--url", &url, "--secret", &secret,
        ];
        args.extend_from_slice(extra);
        cli(&ns, &cfg, &db, &args)?;
    }
    // Refused when saved: loopback without the allowlist is tested in the unit tests; here a
    // link-local address, which the allowlist does not open.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(bin())
        .args(["--config"])
        .arg(&cfg)
        .arg("--db")
        .arg(&db)
        .args([
            "triggers",
            "add",
            "--name",
            "meta",
            "--url",
            "http://169.254.169.254/x",
        ])
        .output()?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("link-local"),
        "metadata address accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Entering the gateway's network namespace only: the socket programs need the host's
    // cgroup hierarchy, which `ip netns exec` hides.
    let agent = AgentProcess::start_keeping_mounts(&bin(), &ns, &cfg, &db, &dir.join("agent.log"))?;
    let result = (|| -> Result<()> {
        // 1. A container logs a matching line.
        let c = "ntl-trig-logger";
        docker::run(c, false, "echo fine; echo 'BOOM 42' >&2")?;
        let (id, _, _, body) = wait_for(&got, "the log line", |b| b["type"] == "nattrail.logscan")?;
        ensure!(body["event"]["metadata"]["captures"]["n"] == "42", "{body}");
        ensure!(body["event"]["metadata"]["container"] == c, "{body}");
        ensure!(body["trigger"]["name"] == "logs", "{body}");
        ensure!(id.starts_with("evt_"), "{id}");
        let _ = Command::new("docker").args(["rm", "-f", c]).output();

        // 2. Connections: one to the watched 198.51.100.2:443, one to port 80 (not watched).
        let specs = [443u16, 80]
            .iter()
            .map(|p| FlowSpec {
                token: format!("trig-{p}"),
                transport: Transport::Tcp,
                client: IpAddr::V4(lab.clients_v4[1]),
                server: SocketAddr::new(IpAddr::V4(SERVER_V4), *p),
                send_bytes: 100,
                hold: Duration::from_millis(50),
                client_port: 0,
            })
            .collect();
        let done = make_flows(&lab.client_ns, specs, 1)?;
        let (_, _, _, body) = wait_for(&got, "the watched connection", |b| {
            b["type"] == "nattrail.conntrack" && b["event"]["metadata"]["kind"] == "new"
        })?;
        let m = &body["event"]["metadata"];
        ensure!(
            m["dst_ip"] == SERVER_V4.to_string() && m["dst_port"] == 443,
            "{body}"
        );
        ensure!(
            m["internal_ip"] == lab.clients_v4[1].to_string()
                && m["internal_port"] == done[0].local.port(),
            "internal endpoint: {body}"
        );
        ensure!(
            m["public_ip"] == GW_PUBLIC_V4.to_string(),
            "public endpoint: {body}"
        );
        // The lab's client is a socket of this very test process: the event names it.
        ensure!(
            m["owner"]["status"] == "local" && m["owner"]["pid"] == std::process::id(),
            "owner: {body}"
        );
        // Its end: the kernel reaps an expired entry (and sends its DESTROY) when its
        // garbage collector or a table dump comes across it; a dump now and then stands in
        // for a busy gateway's collector.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ended = got.lock().unwrap().iter().any(|w| {
                w.3["type"] == "nattrail.conntrack"
                    && w.3["event"]["metadata"]["kind"] == "destroy"
                    && w.3["event"]["metadata"]["dst_port"] == 443
            });
            if ended {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no webhook for the watched connection's end"
            );
            lab.gw_sh(&["conntrack", "-L"])?;
            std::thread::sleep(Duration::from_millis(500));
        }
        ensure!(
            !got.lock()
                .unwrap()
                .iter()
                .any(|w| w.3["event"]["metadata"]["dst_port"] == 80),
            "a connection to port 80 was sent"
        );

        // A trigger added while the agent runs applies at once; `triggers test` sends a
        // sample of the real payload through the agent.
        cli(
            &ns,
            &cfg,
            &db,
            &[
                "triggers",
                "add",
                "--name",
                "late",
                "--url",
                &url,
                "--secret",
                &secret,
                "--source",
                "logscan",
                "--message",
                "LATE$",
            ],
        )?;
        let c = "ntl-trig-late";
        docker::run(c, false, "echo 'BOOM 7 LATE'")?;
        wait_for(&got, "the trigger added at run time", |b| {
            b["trigger"]["name"] == "late" && b["event"]["message"] == "BOOM 7 LATE"
        })?;
        let _ = Command::new("docker").args(["rm", "-f", c]).output();
        let out = cli(&ns, &cfg, &db, &["triggers", "test", "logs"])?;
        ensure!(out.contains("delivered"), "{out}");
        wait_for(&got, "the test delivery", |b| {
            b["event"]["metadata"]["test"] == true
        })?;

        // 3. A burst overflows the 4 KiB socket buffer: a capture gap, an agent webhook.
        let client = lab.clients_v4[0];
        run_in(&lab.client_ns, move || {
            let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 0))?;
            for p in 0..5_000u16 {
                sock.send_to(b"burst", SocketAddr::new(IpAddr::V4(SERVER_V4), 20_000 + p))?;
            }
            Ok(())
        })?;
        let (_, _, _, body) = wait_for(&got, "the capture gap", |b| {
            b["type"] == "nattrail.agent" && b["event"]["metadata"]["kind"] == "capture_gap"
        })?;
        ensure!(body["event"]["metadata"]["kind"] == "capture_gap", "{body}");
        ensure!(
            body["event"]["metadata"]["lost"].as_u64() > Some(0),
            "{body}"
        );

        // Every webhook carried a signature that the receiver's own code verified.
        let all = got.lock().unwrap().clone();
        for (id, ts, sig, _) in &all {
            ensure!(
                !sig.is_empty() && !id.is_empty() && !ts.is_empty(),
                "unsigned webhook"
            );
        }
        // The delivery log counts exactly the webhooks received (its rows are written after
        // each answer, so wait for the last ones).
        let deadline = Instant::now() + Duration::from_secs(10);
        let (logged, received) = loop {
            let out = cli(
                &ns,
                &cfg,
                &db,
                &[
                    "sql",
                    "--json",
                    "SELECT count(*) FROM webhook_deliveries WHERE outcome = 'delivered'",
                ],
            )?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let logged = v["rows"][0][0].as_u64().context("delivered count")?;
            let received = got.lock().unwrap().len() as u64;
            if logged == received || Instant::now() > deadline {
                break (logged, received);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        ensure!(
            logged == received && received >= all.len() as u64,
            "delivery log counts {logged} delivered, the receiver got {received}"
        );
        let kinds: Vec<String> = all
            .iter()
            .map(|w| format!("{}/{}", w.3["type"], w.3["event"]["metadata"]["kind"]))
            .collect();
        println!("{} webhooks received and verified: {kinds:?}", all.len());
        every_counter_in_metrics_and_status(&ns, &cfg, &db)
    })();
    let st = agent.stop();
    server.stop()?;
    result?;
    ensure!(st?.success(), "agent exit");
    Ok(())
}

/// Every counter the registry declares, for every component this agent runs (conntrack,
/// stages, writer, log scanning, webhooks, API, database), is a sample in `/metrics` and a
/// key in `status --json`; and `/metrics` has no sample the registry does not declare.
fn every_counter_in_metrics_and_status(ns: &str, cfg: &Path, db: &Path) -> Result<()> {
    let token = std::fs::read_to_string(nattrail::store::files::private_dir(db).join("api.token"))?;
    let (code, text) = nattrail_lab::http::request(
        ns,
        "GET",
        "http://127.0.0.1:7483/metrics",
        Some(token.trim()),
        None,
    )?;
    ensure!(code == 200, "/metrics: {code}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let status: serde_json::Value =
        serde_json::from_str(&cli(ns, cfg, db, &["status", "--json"])?)?;
    let stage_names: Vec<String> = status["agent"]["stages"]
        .as_array()
        .context("stages in status")?
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    ensure!(
        stage_names.len() >= 3,
        "conntrack, logs and scan stages: {stage_names:?}"
    );
    let mut declared = std::collections::BTreeSet::new();
    let mut checked = 0;
    for (component, fields, path) in nattrail::status::catalogue() {
        let mut section = &status;
        for k in path {
            section = &section[*k];
        }
        // Stages are a list of sections, one per stage, labelled by name.
        let instances: Vec<(Option<&str>, &serde_json::Value)> = match section.as_array() {
            Some(list) => list.iter().map(|s| (s["name"].as_str(), s)).collect(),
            None => vec![(None, section)],
        };
        ensure!(
            instances.iter().all(|(_, s)| s.is_object()),
            "no section {path:?} for {component} in status --json"
        );
        for f in fields {
            let suffix = match f.kind {
                nattrail::pipeline::metrics::Kind::Counter => "_total",
                nattrail::pipeline::metrics::Kind::Gauge => "",
            };
            let name = format!("nattrail_{component}_{}{suffix}", f.metric);
            declared.insert(name.clone());
            for (label, s) in &instances {
                ensure!(
                    s.get(f.name).is_some(),
                    "{component}.{} missing from status --json {path:?}: {s}",
                    f.name
                );
                let found = scrape.samples.iter().any(|x| {
                    x.metric == name && label.is_none_or(|l| x.labels.get("stage") == Some(l))
                });
                ensure!(found, "{name} {label:?} missing from /metrics");
                checked += 1;
            }
        }
    }
    let undeclared: Vec<&str> = scrape
        .samples
        .iter()
        .map(|s| s.metric.as_str())
        .filter(|m| !m.starts_with("nattrail_component_") && !declared.contains(*m))
        .collect();
    ensure!(undeclared.is_empty(), "undeclared samples: {undeclared:?}");
    // Vector's view: the conntrack reader's discards say whether they were intended.
    for intentional in ["true", "false"] {
        ensure!(
            scrape.samples.iter().any(|s| {
                s.metric == "nattrail_component_discarded_events_total"
                    && s.labels.get("component") == Some("conntrack")
                    && s.labels.get("intentional") == Some(intentional)
            }),
            "no conntrack discards with intentional={intentional}"
        );
    }
    println!(
        "{checked} counter readings ({} families) found in /metrics and status --json",
        declared.len()
    );
    Ok(())
}
