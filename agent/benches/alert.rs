//! `cargo xtask bench alert`: latency from a container writing a line to its webhook arriving,
//! through the real chain — dockerd, the agent's tail, scan worker, writer, event bus,
//! dispatcher, signed HTTP delivery — to a receiver on 127.0.0.1. The line's Docker
//! timestamp is the start; the receiver's clock on arrival the end (same host, same clock).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use chrono::{DateTime, Utc};
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::docker;
use nattrail_lab::scratch::Scratch;

const LINES: usize = 1_000;
/// Between lines, in the container: a steady stream, not one burst.
const GAP_MS: &str = "0.005";

type Arrivals = Arc<Mutex<Vec<(DateTime<Utc>, DateTime<Utc>)>>>;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

fn cli(cfg: &std::path::Path, db: &std::path::Path, args: &[&str]) -> Result<()> {
    nattrail_lab::agent::cli(&bin(), None, cfg, db, args).map(|_| ())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    let rt = tokio::runtime::Runtime::new()?;
    let arrivals: Arrivals = Arc::default();
    let port = rt.block_on({
        let arrivals = Arc::clone(&arrivals);
        async move {
            let app = Router::new()
                .route(
                    "/hook",
                    post(|State(a): State<Arrivals>, b: Bytes| async move {
                        let now = Utc::now();
                        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                        if let Some(ts) = v["event"]["ts"]
                            .as_str()
                            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        {
                            a.lock().unwrap().push((ts.with_timezone(&Utc), now));
                        }
                        axum::http::StatusCode::NO_CONTENT
                    }),
                )
                .with_state(arrivals);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = l.local_addr()?.port();
            tokio::spawn(async move { axum::serve(l, app).await });
            anyhow::Ok(port)
        }
    })?;
    let dir = Scratch::new("bench-alert")?;
    let (cfg, db) = (dir.join("agent.toml"), dir.join("trail.duckdb"));
    std::fs::write(
        &cfg,
        "[conntrack]\nenabled = false\n[api]\nlisten = \"127.0.0.1:7484\"\n\
         [docker]\nhits_per_sec = 5000\nhits_burst = 5000\n\
         [webhooks]\nallow = [\"127.0.0.1/32\"]\n",
    )?;
    cli(
        &cfg,
        &db,
        &[
            "rules",
            "add",
            "--name",
            "alert",
            "--pattern",
            r"ALERT (?P<n>\d+)",
            "--severity",
            "error",
        ],
    )?;
    let url = format!("http://127.0.0.1:{port}/hook");
    cli(
        &cfg,
        &db,
        &[
            "triggers",
            "add",
            "--name",
            "bench",
            "--url",
            &url,
            "--secret",
            "whsec_YmVuY2gta2V5",
            "--source",
            "logscan",
        ],
    )?;
    let mut agent = AgentProcess::start_on_host(&bin(), &cfg, &db, &dir.join("agent.log"))?;
    agent.wait_for_log("dockerd reached", Duration::from_secs(30))?;
    let name = "ntl-bench-alert";
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do i=$((i+1)); echo ALERT $i; sleep {GAP_MS}; done"
    );
    docker::run(name, false, &script)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.lock().unwrap().len() < LINES {
        if Instant::now() > deadline {
            bail!(
                "only {} of {LINES} webhooks arrived; agent log:\n{}",
                arrivals.lock().unwrap().len(),
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", name])
        .output();
    agent.stop().context("stopping the agent")?;
    let mut ms: Vec<f64> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(sent, got)| (*got - *sent).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "{} lines -> {} webhooks; latency line -> webhook: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; target p99 <= 100 ms",
        LINES,
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    );
    Ok(())
}
