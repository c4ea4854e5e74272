//! Container log scanning against a real dockerd: exact hits per rule and stream, cooldown and
//! token-bucket suppressions, a TTY container, a 5 MiB line, hot reload through the CLI, a
//! broken regex, and no lost or repeated hit across container, agent and dockerd restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::docker;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::sh;

const API: &str = "127.0.0.1:7481";
// Unique container names: another clone's test run may share this dockerd.
const PREFIX: &str = "ntl-logs";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

struct Env {
    cfg: PathBuf,
    db: PathBuf,
    log: PathBuf,
}

impl Env {
    fn run(&self, args: &[&str]) -> Result<Output> {
        nattrail_lab::agent::cli_output(&bin(), None, &self.cfg, &self.db, args)
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        nattrail_lab::agent::cli(&bin(), None, &self.cfg, &self.db, args)
    }

    fn start(&self) -> Result<AgentProcess> {
        let mut a = AgentProcess::start_on_host(&bin(), &self.cfg, &self.db, &self.log)?;
        a.wait_for_log("dockerd reached", Duration::from_secs(30))?;
        Ok(a)
    }

    /// Hits as (container, rule, ts in µs, message).
    fn hits(&self) -> Result<Vec<(String, String, String, String)>> {
        let out = self.cli(&[
            "sql",
            "--json",
            "SELECT metadata->>'container', metadata->>'rule_name', \
             strftime(ts, '%Y-%m-%dT%H:%M:%S.%fZ'), message \
             FROM event_log WHERE source = 'logscan' ORDER BY id",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
        Ok(v["rows"]
            .as_array()
            .context("sql rows")?
            .iter()
            .map(|r| (s(&r[0]), s(&r[1]), s(&r[2]), s(&r[3])))
            .collect())
    }

    fn logscan(&self) -> Result<serde_json::Value> {
        let out = self.cli(&["status", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["agent"]["logscan"].clone())
    }
}

fn name(n: &str) -> String {
    format!("{PREFIX}-{n}")
}

/// Waits until `f` holds, or fails with its last reading.
fn wait_until<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<(bool, T)>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, v) = f()?;
        if ok {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: still {v:?} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Docker's RFC 3339 nano timestamp cut to microseconds, as the event log stores it.
fn micros(ts: &str) -> Result<String> {
    let t: DateTime<Utc> = DateTime::parse_from_rfc3339(ts)?.with_timezone(&Utc);
    Ok(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

fn vm_hwm_mib(pid: u32) -> u64 {
    nattrail_lab::memory::peak_rss_mib_of(&pid.to_string())
}

fn cleanup() {
    if let Ok(list) = sh(&["docker", "ps", "-aq", "--filter", &format!("name={PREFIX}")]) {
        for id in list.split_whitespace() {
            let _ = sh(&["docker", "rm", "-f", id]);
        }
    }
}

#[test]
fn docker_log_scanning() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    cleanup();
    let dir = Scratch::new("docker-logs")?;
    let env = Env {
        cfg: dir.join("nattrail.toml"),
        db: dir.join("trail.duckdb"),
        log: dir.join("agent.log"),
    };
    std::fs::write(
        &env.cfg,
        format!(
            "[conntrack]\nenabled = false\n[api]\nlisten = \"{API}\"\n\
             [docker]\nhits_per_sec = 50\nhits_burst = 50\n"
        ),
    )?;
    // Rules stored before the agent runs: the CLI writes the file directly.
    for (n, p, extra) in [
        (
            "err-out",
            r"ERR-(?P<code>\d+)",
            &["--stream", "stdout", "--severity", "error"][..],
        ),
        ("warn-err", r"WARN-(\d+)", &["--stream", "stderr"][..]),
        ("cool", "COOL", &["--cooldown", "60s"][..]),
        ("flood", "FLOOD", &[][..]),
        ("seq", r"^SEQ-\d+$", &["--stream", "stdout"][..]),
    ] {
        let mut args = vec!["rules", "add", "--name", n, "--pattern", p];
        args.extend_from_slice(extra);
        env.cli(&args)?;
    }
    // A broken regex is refused with the compiler's own message.
    let out = env.run(&["rules", "add", "--name", "broken", "--pattern", "(unclosed"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a broken pattern was accepted");
    ensure!(err.contains("unclosed group"), "no compiler message: {err}");

    let mut agent = env.start()?;
    let scanned = scanning(&env, &mut agent);
    let reloaded = scanned.and_then(|()| hot_reload(&env));
    let restarts = reloaded.and_then(|()| restarts(&env, agent));
    cleanup();
    restarts
}

/// Known lines on both streams, a TTY container, a flood and a 5 MiB line.
fn scanning(env: &Env, agent: &mut AgentProcess) -> Result<()> {
    let (mixed, tty, flood, big) = (name("mixed"), name("tty"), name("flood"), name("big"));
    docker::run(
        &mixed,
        false,
        "echo ERR-1; echo ERR-99 >&2; echo WARN-50; echo WARN-1 >&2; echo noise; \
         echo ERR-2; echo WARN-2 >&2; for i in 1 2 3 4 5 6 7 8 9 10; do echo COOL $i; done",
    )?;
    docker::run(&tty, true, "echo ERR-7; echo WARN-7 >&2")?;
    // 200 lines in one write: dockerd stamps them within microseconds of each other, and the
    // bucket (50 a second, burst 50) runs on those stamps.
    docker::run(&flood, false, "yes FLOOD | head -n 200")?;
    docker::run(
        &big,
        false,
        "head -c 5242880 /dev/zero | tr '\\0' x; echo; echo ERR-8",
    )?;
    for c in [&mixed, &tty, &flood, &big] {
        docker::wait_exited(c, Duration::from_secs(60))?;
    }
    let expected: BTreeMap<(String, &str), usize> = [
        ((mixed.clone(), "err-out"), 2),
        ((mixed.clone(), "warn-err"), 2),
        ((mixed.clone(), "cool"), 1),
        ((tty.clone(), "err-out"), 1),
        ((big.clone(), "err-out"), 1),
    ]
    .into();
    let counts = || -> Result<BTreeMap<(String, String), usize>> {
        let mut m = BTreeMap::new();
        for h in env.hits()? {
            *m.entry((h.0, h.1)).or_insert(0) += 1;
        }
        Ok(m)
    };
    wait_until("hits of the known lines", Duration::from_secs(30), || {
        let c = counts()?;
        let ok = expected
            .iter()
            .all(|((k, r), n)| c.get(&(k.clone(), r.to_string())) == Some(n));
        Ok((ok, c))
    })
    .with_context(|| {
        // Seen once on a machine where dockerd had just been installed (the 5 MiB line's
        // ERR-8 missing), never since: what the scanner counted and logged, to tell why.
        let log = agent.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "logscan status: {}\nagent log, last lines:\n{}",
            env.logscan().unwrap_or_default(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    // Nothing more arrives later.
    std::thread::sleep(Duration::from_secs(1));
    let c = counts()?;
    for ((k, r), n) in &c {
        if k == &flood {
            continue;
        }
        ensure!(
            expected.get(&(k.clone(), r.as_str())) == Some(n),
            "unexpected hits {k} {r}: {n} (all: {c:?})"
        );
    }
    let hits = env.hits()?;
    let err1 = hits
        .iter()
        .find(|h| h.3 == "ERR-1")
        .context("hit of ERR-1")?;
    ensure!(err1.0 == mixed, "{err1:?}");
    let meta = env.cli(&[
        "sql",
        "--json",
        "SELECT metadata FROM event_log WHERE message = 'ERR-1'",
    ])?;
    ensure!(
        meta.contains(r#"\"code\":\"1\""#),
        "captures by name: {meta}"
    );
    ensure!(
        hits.iter().any(|h| h.3 == "WARN-2" && h.1 == "warn-err"),
        "{hits:?}"
    );
    let s = env.logscan()?;
    let flood_hits = c
        .get(&(flood.clone(), "flood".into()))
        .copied()
        .unwrap_or(0) as u64;
    let bucket = s["suppressed_bucket"].as_u64().unwrap_or(0);
    eprintln!(
        "flood: {flood_hits} hits, {bucket} held back by the bucket; agent peak RSS {} MiB; \
         logscan {s}",
        vm_hwm_mib(agent.pid())
    );
    ensure!(s["suppressed_cooldown"] == 9, "cooldown: {s}");
    // The burst of 50, and nothing refilled: the bucket runs on the log's clock, on which the
    // 200 lines took well under the 20 ms a token takes (however long scanning them took).
    ensure!(
        (flood_hits, bucket) == (50, 150),
        "flood: {flood_hits} hits, {bucket} held back"
    );
    ensure!(s["tails"]["truncated"].as_u64() >= Some(1), "{s}");
    ensure!(
        s["tails"]["skipped_bytes"].as_u64() >= Some(4 << 20),
        "the 5 MiB line was kept: {s}"
    );
    ensure!(s["compile_errors"].as_array().is_some_and(|a| a.is_empty()));
    // A 5 MiB line costs the agent at most its 1 MiB cap and a few frames.
    ensure!(
        vm_hwm_mib(agent.pid()) < 256,
        "peak RSS {}",
        vm_hwm_mib(agent.pid())
    );
    let _ = agent;
    Ok(())
}

/// A rule added through the CLI applies within a second, and stops when removed.
fn hot_reload(env: &Env) -> Result<()> {
    let ticker = name("ticker");
    docker::run(
        &ticker,
        false,
        "i=0; while true; do i=$((i+1)); echo TICK-$i; sleep 0.1; done",
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let added = Utc::now();
    let out = env.cli(&["rules", "add", "--name", "tick", "--pattern", r"TICK-\d+"])?;
    ensure!(out.contains("added"), "{out}");
    let tick_ts = || -> Result<Vec<DateTime<Utc>>> {
        env.hits()?
            .into_iter()
            .filter(|h| h.1 == "tick")
            .map(|h| Ok(DateTime::parse_from_rfc3339(&h.2)?.with_timezone(&Utc)))
            .collect()
    };
    let first = wait_until("a TICK hit", Duration::from_secs(10), || {
        let t = tick_ts()?;
        Ok((!t.is_empty(), t))
    })?[0];
    let lag = (first - added).num_milliseconds();
    eprintln!("hot reload: first hit on a line logged {lag} ms after the rule was added");
    ensure!(lag < 1000, "rule applied after {lag} ms");
    ensure!(
        lag > -200,
        "a line logged before the rule was scanned with it ({lag} ms)"
    );
    std::thread::sleep(Duration::from_secs(1));
    env.cli(&["rules", "rm", "tick"])?;
    let removed = Utc::now();
    std::thread::sleep(Duration::from_secs(2));
    let late: Vec<_> = tick_ts()?
        .into_iter()
        .filter(|t| (*t - removed).num_milliseconds() > 1000)
        .collect();
    ensure!(late.is_empty(), "hits after removal: {late:?}");
    let _ = sh(&["docker", "rm", "-f", &ticker]);
    Ok(())
}

/// A container restart, an agent restart and a dockerd restart: the hits of a counting
/// container equal its log, line for line.
fn restarts(env: &Env, agent: AgentProcess) -> Result<()> {
    let seq = name("seq");
    let _ = sh(&["docker", "rm", "-f", &seq]);
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        &seq,
        "--stop-timeout",
        "1",
        docker::IMAGE,
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo SEQ-$i; sleep 0.05; done",
    ])?;
    std::thread::sleep(Duration::from_millis(1500));
    sh(&["docker", "restart", "-t", "1", &seq])?;
    std::thread::sleep(Duration::from_millis(1500));
    agent.stop()?;
    std::thread::sleep(Duration::from_secs(1));
    let agent = env.start()?;
    std::thread::sleep(Duration::from_millis(1500));
    docker::restart_dockerd()?;
    sh(&["docker", "start", &seq])?;
    std::thread::sleep(Duration::from_millis(1500));
    sh(&["docker", "stop", "-t", "1", &seq])?;
    let truth: BTreeSet<(String, String)> = docker::logs(&seq)?
        .into_iter()
        .filter(|(s, t)| s.starts_with("stdout ") && t.starts_with("SEQ-"))
        .map(|(s, t)| Ok((micros(&s["stdout ".len()..])?, t)))
        .collect::<Result<_>>()?;
    ensure!(truth.len() > 60, "only {} lines logged", truth.len());
    // (ts, message) of the SEQ container's hits.
    let seq_hits = || -> Result<Vec<(String, String)>> {
        Ok(env
            .hits()?
            .into_iter()
            .filter(|h| h.0 == seq && h.1 == "seq")
            .map(|h| (h.2, h.3))
            .collect())
    };
    let got = wait_until("hits of every SEQ line", Duration::from_secs(30), || {
        let n = seq_hits()?.len();
        Ok((n >= truth.len(), n))
    });
    let hits = seq_hits()?;
    let set: BTreeSet<(String, String)> = hits.iter().cloned().collect();
    let lost: Vec<_> = truth.difference(&set).collect();
    let extra: Vec<_> = set.difference(&truth).collect();
    eprintln!(
        "restarts: {} lines logged, {} hits, {} lost, {} unexpected, {} duplicated",
        truth.len(),
        hits.len(),
        lost.len(),
        extra.len(),
        hits.len() - set.len()
    );
    got?;
    ensure!(lost.is_empty(), "lost: {lost:?}");
    ensure!(extra.is_empty(), "unexpected: {extra:?}");
    ensure!(hits.len() == set.len(), "duplicated hits");
    let st = agent.stop()?;
    ensure!(st.success(), "agent exit {st}");
    Ok(())
}
