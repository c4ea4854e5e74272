//! The admin HTTP API of a real agent in the lab's gateway namespace, over real HTTP: auth,
//! the validation table, Prometheus metrics, queries during ingestion, and the CLI giving the
//! same answers through the agent and from the file. Needs root.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::{Server, alternating, make_flows};
use nattrail_lab::{LabOptions, NatLab, SERVER_V4};
use serde_json::{Value, json};

const BASE: &str = "http://127.0.0.1:7466";

/// One row of the validation table: method, path, body, status, error code, detail needle.
type Case = (
    &'static str,
    &'static str,
    Option<String>,
    u16,
    &'static str,
    &'static str,
);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

/// One HTTP exchange from inside the gateway namespace: (status, body).
fn http(
    ns: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> Result<(u16, String)> {
    nattrail_lab::http::request(ns, method, &format!("{BASE}{path}"), token, body)
}

/// A GET over the Unix socket, HTTP/1.1 by hand: (status, body).
fn unix_get(sock: &Path, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: nattrail\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The CLI inside the gateway namespace; returns stdout, failing with stderr.
fn cli(ns: &str, cfg: &Path, db: &Path, args: &[&str]) -> Result<String> {
    nattrail_lab::agent::cli(&bin(), Some(ns), cfg, db, args)
}

#[test]
fn admin_api_over_http() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 4,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[9100], 300)?;
    let dir = Scratch::new("api")?;
    let (db, cfg) = (dir.join("trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[docker]\nenabled = false\n[store]\ncommit_interval_ms = 100\n[api]\nlisten = \"127.0.0.1:7466\"\nsocket = \"{}\"\nsql_row_limit = 1000\nmax_body_bytes = 4096\n",
            dir.join("run/api.sock").display()
        ),
    )?;
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("agent.log"))?;
    let ns = lab.gw_ns.clone();
    // The scratch directory is not private (0755), so the token is in one the agent made.
    let token_file = nattrail::store::files::private_dir(&db).join("api.token");
    ensure!(
        token_file == dir.join("trail.duckdb.private/api.token"),
        "{}",
        token_file.display()
    );
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
        ensure!(mode(&token_file)? == 0o600, "token file mode");
        ensure!(
            mode(token_file.parent().unwrap())? == 0o700,
            "token dir mode"
        );
        ensure!(mode(&dir.join("run"))? == 0o750, "socket dir mode");
        ensure!(mode(&dir.join("run/api.sock"))? == 0o660, "socket mode");
    }

    // Auth: /health is open and names no path without the token; everything else needs it.
    let (st, body) = http(&ns, "GET", "/health", None, None)?;
    ensure!(
        st == 200 && serde_json::from_str::<Value>(&body)? == json!({"status": "ok"}),
        "health: {st} {body}"
    );
    let (st, body) = http(&ns, "GET", "/health", Some(&token), None)?;
    ensure!(
        st == 200 && serde_json::from_str::<Value>(&body)?["db"] == db.display().to_string(),
        "health with the token: {st} {body}"
    );
    for path in ["/api/v1/stats", "/metrics", "/api/v1/flows"] {
        let (st, body) = http(&ns, "GET", path, None, None)?;
        ensure!(st == 401, "{path} without token: {st} {body}");
        let e: Value = serde_json::from_str(&body)?;
        ensure!(e["error"] == "unauthorized", "{body}");
        let (st, _) = http(&ns, "GET", path, Some("wrong-token"), None)?;
        ensure!(st == 401, "{path} with a wrong token: {st}");
    }
    let t = Some(token.as_str());

    // The Unix socket serves the same API; reaching it (0660 in a 0750 directory of the
    // agent's) is the authorisation, so its group's members need no token.
    let sock = dir.join("run/api.sock");
    let (st, body) = unix_get(&sock, "/api/v1/stats", None)?;
    ensure!(
        st == 200 && body.contains("conntrack->writer"),
        "unix socket stats: {st} {body}"
    );

    // Queries answer while ingestion runs.
    let lab_client_ns = lab.client_ns.clone();
    let traffic = {
        let specs = alternating(&lab, &server, 120, "busy");
        std::thread::spawn(move || make_flows(&lab_client_ns, specs, 4))
    };
    let mut answered = 0;
    while !traffic.is_finished() {
        let (st, body) = http(&ns, "GET", "/api/v1/flows?limit=50&proto=udp", t, None)?;
        ensure!(st == 200, "flows during ingestion: {st} {body}");
        let (st, body) = http(
            &ns,
            "POST",
            "/api/v1/sql",
            t,
            Some(json!({"sql": "SELECT count(*) AS n FROM conntrack_events"}).to_string()),
        )?;
        ensure!(st == 200, "sql during ingestion: {st} {body}");
        answered += 2;
    }
    let done = traffic.join().expect("traffic thread")?;
    ensure!(answered >= 4, "only {answered} queries during ingestion");
    lab.wait_snat_flows_at_most(0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));

    // /metrics parses as Prometheus text and carries the stage counters.
    let (st, text) = http(&ns, "GET", "/metrics", t, None)?;
    ensure!(st == 200, "metrics: {st}");
    // Prometheus' own linter accepts the exposition (base units, suffixes, help texts).
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus)")?;
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .context("promtool stdin")?
            .write_all(text.as_bytes())?;
    }
    let lint = promtool.wait_with_output()?;
    ensure!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {:?}\n{}{}",
        lint.status,
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let received = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "nattrail_stage_received_total"
                && s.labels.get("stage") == Some("conntrack->writer")
        })
        .context("no stage counter in /metrics")?;
    ensure!(
        matches!(received.value, prometheus_parse::Value::Counter(v) if v >= 240.0),
        "stage received: {:?}",
        received.value
    );
    ensure!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "nattrail_writer_rows_total"),
        "no writer counter"
    );

    // The validation table: each bad input gets its status, code and a message naming it.
    let sql = |s: &str| Some(json!({ "sql": s }).to_string());
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/sql",
            Some("{\"sql\": ".into()),
            400,
            "bad_json",
            "EOF",
        ),
        (
            "POST",
            "/api/v1/sql",
            Some(json!({"sql": "SELECT 1", "rows": 5}).to_string()),
            400,
            "bad_json",
            "unknown field",
        ),
        (
            "GET",
            "/api/v1/who?ip=198.51.100.1&port=1&at=2026-01-01T00:00:00Z&colour=red",
            None,
            400,
            "bad_query_string",
            "unknown field",
        ),
        (
            "GET",
            "/api/v1/who?ip=198.51.100.1&port=1&at=yesterday",
            None,
            400,
            "bad_request",
            "yesterday",
        ),
        (
            "GET",
            "/api/v1/who?ip=300.1.1.1&port=1&at=2026-01-01T00:00:00Z",
            None,
            400,
            "bad_request",
            "300.1.1.1",
        ),
        (
            "GET",
            "/api/v1/who?ip=198.51.100.1&port=99999&at=2026-01-01T00:00:00Z",
            None,
            400,
            "bad_query_string",
            "port",
        ),
        (
            "GET",
            "/api/v1/flows?limit=0",
            None,
            400,
            "bad_request",
            "limit",
        ),
        (
            "GET",
            "/api/v1/events?kind=sideways",
            None,
            400,
            "bad_request",
            "sideways",
        ),
        ("GET", "/api/v1/nothing", None, 404, "not_found", "route"),
        ("GET", "/api/v1/rules/42", None, 404, "not_found", "id 42"),
        (
            "DELETE",
            "/api/v1/rules/42",
            None,
            404,
            "not_found",
            "id 42",
        ),
        (
            "PATCH",
            "/api/v1/rules/42",
            Some(json!({"enabled": false}).to_string()),
            404,
            "not_found",
            "id 42",
        ),
        ("GET", "/api/v1/rules/abc", None, 400, "bad_path", "abc"),
        (
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "x", "pattern": "(unclosed"}).to_string()),
            422,
            "bad_pattern",
            "unclosed group",
        ),
        (
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "x", "pattern": "a", "colour": "red"}).to_string()),
            400,
            "bad_json",
            "colour",
        ),
        (
            "POST",
            "/api/v1/rules/test",
            Some(json!({"line": "x", "pattern": "[z-a]"}).to_string()),
            422,
            "bad_pattern",
            "invalid character class range",
        ),
        (
            "POST",
            "/api/v1/sql",
            Some(json!({"sql": "SELECT * FROM range(5000)"}).to_string()),
            422,
            "row_limit",
            "1000",
        ),
        (
            "POST",
            "/api/v1/sql",
            sql("INSERT INTO capture_gaps VALUES (1, 'x', now(), now(), 0, 'x')"),
            403,
            "read_only",
            "INSERT",
        ),
        (
            "POST",
            "/api/v1/sql",
            sql("CREATE TABLE owned (a INT)"),
            403,
            "read_only",
            "CREATE",
        ),
        (
            "POST",
            "/api/v1/sql",
            sql("SELECT 1; DROP TABLE conntrack_events"),
            403,
            "read_only",
            "2 statements",
        ),
        (
            "POST",
            "/api/v1/sql",
            sql("SELECT nope FROM conntrack_events"),
            400,
            "query_failed",
            "nope",
        ),
        (
            "POST",
            "/api/v1/sql",
            Some(json!({"sql": "x".repeat(8000)}).to_string()),
            413,
            "bad_json",
            "",
        ),
    ];
    let count = || -> Result<Value> {
        let (st, text) = http(
            &ns,
            "POST",
            "/api/v1/sql",
            t,
            sql(
                "SELECT (SELECT count(*) FROM conntrack_events) AS events, (SELECT count(*) FROM capture_gaps) AS gaps",
            ),
        )?;
        ensure!(st == 200, "{text}");
        Ok(serde_json::from_str::<Value>(&text)?["rows"].clone())
    };
    let before = count()?;
    for (method, path, body, want, code, needle) in cases {
        let (st, text) = http(&ns, method, path, t, body)?;
        let e: Value = serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: not JSON: {text}"))?;
        ensure!(
            st == want && e["error"] == code && e["detail"].as_str().unwrap_or("").contains(needle),
            "{method} {path}: got {st} {text}, want {want} {code} mentioning {needle:?}"
        );
    }
    // The refused writes changed nothing.
    let after = count()?;
    ensure!(
        before == after && before[0][0].as_u64().is_some_and(|n| n > 0),
        "row counts before {before}, after {after}"
    );

    // The CLI through the agent, then from the file once it stopped: the same answers.
    let d = &done[7];
    let seen = server.seen(&d.spec.token).context("flow not seen")?;
    let at = chrono::DateTime::<chrono::Utc>::from(d.inside()).to_rfc3339();
    let port = seen.peer.port().to_string();
    let queries: Vec<Vec<&str>> = vec![
        vec![
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
        ],
        vec!["flows", "--proto", "tcp", "--limit", "1000", "--json"],
        vec!["events", "--limit", "50", "--json"],
        vec![
            "events", "--limit", "50", "--cursor", "20", "--kind", "destroy", "--json",
        ],
        vec![
            "sql",
            "SELECT kind, count(*) AS n FROM conntrack_events GROUP BY kind ORDER BY kind",
            "--json",
        ],
    ];
    let live: Vec<String> = queries
        .iter()
        .map(|q| cli(&ns, &cfg, &db, q))
        .collect::<Result<_>>()?;
    let live_status: Value = serde_json::from_str(&cli(&ns, &cfg, &db, &["status", "--json"])?)?;
    ensure!(live_status["agent_state"] == "running", "{live_status}");
    let who: Value = serde_json::from_str(&live[0])?;
    ensure!(
        who["status"] == "found" && who["matches"][0]["internal_port"] == d.local.port(),
        "who through the agent: {who}"
    );

    let stopped = SystemTime::now();
    ensure!(agent.stop()?.success(), "agent exit");
    for (q, through_agent) in queries.iter().zip(&live) {
        let from_file = cli(&ns, &cfg, &db, q)?;
        let (a, b): (Value, Value) = (
            serde_json::from_str(through_agent)?,
            serde_json::from_str(&from_file)?,
        );
        ensure!(
            a == b,
            "{q:?} differs:\nthrough the agent: {a}\nfrom the file:     {b}"
        );
    }
    let file_status: Value = serde_json::from_str(&cli(&ns, &cfg, &db, &["status", "--json"])?)?;
    ensure!(
        file_status["agent_state"] == "stopped"
            && file_status["gaps_24h"] == live_status["gaps_24h"]
            && file_status["agent"]["stages"][0]["name"]
                == live_status["agent"]["stages"][0]["name"],
        "status differs:\nlive: {live_status}\nfile: {file_status}"
    );
    ensure!(stopped.elapsed()? < Duration::from_secs(120));
    server.stop()?;
    Ok(())
}

/// With conntrack off the agent has no source yet, but it keeps running and serving.
#[test]
fn agent_without_conntrack_keeps_serving() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 1,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let dir = Scratch::new("api-idle")?;
    let (db, cfg) = (dir.join("trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        "[conntrack]\nenabled = false\n[docker]\nenabled = false\n",
    )?;
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("agent.log"))?;
    std::thread::sleep(Duration::from_secs(2));
    let (st, body) = http(&lab.gw_ns, "GET", "/health", None, None)?;
    ensure!(
        st == 200,
        "health after 2 s: {st} {body}\n{}",
        agent.log_text()
    );
    ensure!(
        !agent.log_text().contains("stopping"),
        "the agent stopped on its own:\n{}",
        agent.log_text()
    );
    ensure!(agent.stop()?.success(), "agent exit");
    Ok(())
}
