//! The locked-down query surface, against a real agent in the lab's gateway namespace: hostile
//! SQL over the API, through the CLI and on the file once the agent stopped; trigger secrets
//! that never come back; private files whatever the umask; token files refused with the
//! reason; a slow-header flood that does not lock out a token holder. Needs root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nattrail_lab::agent::{AgentProcess, cli_output};
use nattrail_lab::netns::run_in;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::{Server, alternating, make_flows};
use nattrail_lab::{LabOptions, NatLab, SERVER_V4};
use serde_json::{Value, json};

const BASE: &str = "http://127.0.0.1:7466";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

/// One HTTP exchange from inside namespace `ns`: (status, body).
fn http(
    ns: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, String)> {
    let body = body.map(|b| b.to_string());
    nattrail_lab::http::request(ns, method, &format!("{BASE}{path}"), token, body)
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Every file below `dir` (relative paths) but the agent's own state and logs, which change
/// while it runs, for "no file was created".
fn tree(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            let rel = p.strip_prefix(dir)?.display().to_string();
            if !rel.starts_with("state") && !rel.ends_with(".log") {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// How a hostile text must be refused: HTTP status and error code over the API, and a
/// needle of the CLI's message.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// DuckDB's parser refuses the text (400 bad_request): nothing of it runs.
    Parser,
    /// Not exactly one query: 403 read_only, before anything runs.
    NotAQuery,
    /// A query DuckDB itself refuses (external access off, read-only transaction, ...).
    Engine,
}

/// The hostile texts. `{dir}` is the test's scratch directory, where none of them may
/// create a file.
fn hostile(dir: &Path) -> Vec<(String, Refusal)> {
    let d = dir.display();
    let long = "SELECT count(*) FROM range(1000000000000::BIGINT) a, range(10) b";
    use Refusal::*;
    vec![
        // Subquery escapes: the old service wrapped the text in `SELECT * FROM (...)`.
        (
            format!(
                "SELECT 1) q; COPY (SELECT * FROM conntrack_events) TO '{d}/p1.csv'; SELECT (1"
            ),
            Parser,
        ),
        (
            "SELECT 1) q; CREATE TABLE pwned AS SELECT 1; SELECT (1".into(),
            Parser,
        ),
        (
            "SELECT 1) q; DELETE FROM conntrack_events; SELECT (1".into(),
            Parser,
        ),
        (
            format!("SELECT 1) q; ATTACH '{d}/evil.db' AS evil; SELECT (1"),
            Parser,
        ),
        (
            "SELECT 1) q; SET enable_external_access = true; SELECT (1".into(),
            Parser,
        ),
        ("SELECT 1) q; INSTALL httpfs; SELECT (1".into(), Parser),
        ("SELECT 1) q; LOAD httpfs; SELECT (1".into(), Parser),
        ("SELECT 1) q; CHECKPOINT; SELECT (1".into(), Parser),
        // The same statements after a query, as a text of several statements.
        (
            format!("SELECT 1; COPY (SELECT * FROM conntrack_events) TO '{d}/p1.csv'"),
            NotAQuery,
        ),
        ("SELECT 1; CREATE TABLE pwned AS SELECT 1".into(), NotAQuery),
        ("SELECT 1; DELETE FROM conntrack_events".into(), NotAQuery),
        (format!("SELECT 1; ATTACH '{d}/evil.db' AS evil"), NotAQuery),
        (
            "SELECT 1; SET enable_external_access = true".into(),
            NotAQuery,
        ),
        ("SELECT 1; INSTALL httpfs".into(), NotAQuery),
        ("SELECT 1; LOAD httpfs".into(), NotAQuery),
        ("SELECT 1; CHECKPOINT".into(), NotAQuery),
        // A long computation before the last statement (run with a 100 ms timeout).
        (format!("{long}; SELECT 1"), NotAQuery),
        // Single statements that are not queries.
        (format!("COPY conntrack_events TO '{d}/p2.csv'"), NotAQuery),
        ("CREATE TABLE pwned (a INT)".into(), NotAQuery),
        ("DELETE FROM conntrack_events".into(), NotAQuery),
        (
            "INSERT INTO capture_gaps SELECT * FROM capture_gaps".into(),
            NotAQuery,
        ),
        (
            "UPDATE event_triggers SET enabled = false".into(),
            NotAQuery,
        ),
        ("DROP TABLE conntrack_events".into(), NotAQuery),
        (format!("ATTACH '{d}/evil2.db' AS e2"), NotAQuery),
        ("SET memory_limit = '8GB'".into(), NotAQuery),
        ("RESET memory_limit".into(), NotAQuery),
        ("PRAGMA enable_profiling = 'json'".into(), NotAQuery),
        (format!("EXPORT DATABASE '{d}/exported'"), NotAQuery),
        ("INSTALL httpfs".into(), NotAQuery),
        ("LOAD httpfs".into(), NotAQuery),
        ("CHECKPOINT".into(), NotAQuery),
        ("VACUUM".into(), NotAQuery),
        (
            "EXPLAIN ANALYZE DELETE FROM conntrack_events".into(),
            NotAQuery,
        ),
        ("BEGIN TRANSACTION".into(), NotAQuery),
        ("SELECT 1; ROLLBACK".into(), NotAQuery),
        // Plain queries that would read the gateway's files.
        ("SELECT * FROM read_text('/etc/shadow')".into(), Engine),
        (
            "SELECT * FROM read_blob('/proc/self/environ')".into(),
            Engine,
        ),
        ("SELECT * FROM read_csv('/etc/shadow')".into(), Engine),
        ("SELECT * FROM read_json('/etc/shadow')".into(), Engine),
        ("SELECT * FROM glob('/root/*')".into(), Engine),
        ("SELECT * FROM query_table('/etc/shadow')".into(), Engine),
        ("FROM '/etc/shadow'".into(), Engine),
        (
            "SELECT * FROM read_text('/proc/self/environ')".into(),
            Engine,
        ),
        // A query that would write: the read-only transaction refuses it.
        ("SELECT nextval('event_trigger_ids')".into(), Engine),
    ]
}

/// Legitimate queries and their exact answers (rows as JSON).
fn legitimate(events: u64) -> Vec<(&'static str, Value)> {
    vec![
        (
            "WITH x AS (SELECT 21 AS a) SELECT a * 2 AS b FROM x",
            json!([[42]]),
        ),
        (
            "SELECT v, sum(v) OVER (ORDER BY v) AS run FROM (VALUES (1), (2), (3)) t(v) ORDER BY v",
            json!([[1, "1"], [2, "3"], [3, "6"]]),
        ),
        (
            "PIVOT (SELECT * FROM (VALUES ('a', 1), ('b', 2)) t(k, v)) ON k IN ('a', 'b') USING first(v)",
            json!([[1, 2]]),
        ),
        ("FROM (VALUES (7)) t(x) SELECT x + 1", json!([[8]])),
        (
            "SELECT nt_ip(281470854561797::UHUGEINT) AS ip",
            json!([["10.77.0.5"]]),
        ),
        (
            "SELECT column_name FROM (DESCRIBE event_triggers) ORDER BY ALL",
            json!([
                ["disabled_reason"],
                ["enabled"],
                ["filter"],
                ["id"],
                ["name"],
                ["rate_per_min"],
                ["updated"],
                ["url"]
            ]),
        ),
        (
            "SELECT count(*) AS n FROM conntrack_events",
            json!([[events]]),
        ),
        (
            "SELECT count(DISTINCT kind) > 0 FROM conntrack_events",
            json!([[true]]),
        ),
        (
            "SELECT 1 AS a UNION ALL SELECT 2 ORDER BY a DESC",
            json!([[2], [1]]),
        ),
    ]
}

/// The row count of every table of the trail.
fn counts(ns: &str, token: &str) -> Result<BTreeMap<String, u64>> {
    let (st, body) = http(
        ns,
        "POST",
        "/api/v1/sql",
        Some(token),
        Some(
            json!({"sql": "SELECT table_name FROM duckdb_tables() UNION ALL \
             SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1"}),
        ),
    )?;
    ensure!(st == 200, "listing tables and views: {st} {body}");
    let tables: Value = serde_json::from_str(&body)?;
    let mut out = BTreeMap::new();
    for t in tables["rows"].as_array().context("rows")? {
        let name = t[0].as_str().context("table name")?;
        let (st, body) = http(
            ns,
            "POST",
            "/api/v1/sql",
            Some(token),
            Some(json!({ "sql": format!("SELECT count(*) FROM \"{name}\"") })),
        )?;
        ensure!(st == 200, "counting {name}: {st} {body}");
        let v: Value = serde_json::from_str(&body)?;
        out.insert(name.to_string(), v["rows"][0][0].as_u64().context("count")?);
    }
    Ok(out)
}

fn cli(ns: &str, cfg: &Path, db: &Path, args: &[&str]) -> Result<std::process::Output> {
    cli_output(&bin(), Some(ns), cfg, db, args)
}

/// The CLI with `input` on its standard input.
fn cli_stdin(ns: &str, cfg: &Path, db: &Path, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin())
        .arg("--config")
        .arg(cfg)
        .arg("--db")
        .arg(db)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nattrail {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn hostile_sql_is_refused_and_secrets_never_come_back() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 2,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let server = Server::start(&lab.server_ns, IpAddr::V4(SERVER_V4), &[9200], 100)?;
    let dir = Scratch::new("lockdown")?;
    let (db, cfg) = (dir.join("state/trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        // eBPF off: every table's row count must stand still while the hostile SQL runs,
        // and the exec program would record the test's own commands (that secrets on a
        // nattrail command line are masked there is checked by tests/ebpf_exec.rs).
        "[docker]\nenabled = false\n[ebpf]\nenabled = false\n[store]\ncommit_interval_ms = 100\n\
         [api]\nlisten = \"127.0.0.1:7466\"\nsql_row_limit = 100000\nsql_max_concurrent = 2\n",
    )?;
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("agent.log"))?;
    let ns = lab.gw_ns.clone();
    let token_file = dir.join("state/api.token");
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let t = Some(token.as_str());

    let specs = alternating(&lab, &server, 6, "lock");
    make_flows(&lab.client_ns, specs, 2)?;
    lab.wait_snat_flows_at_most(0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));

    // Secrets and header values through the API, the CLI's arguments and its stdin.
    let secrets = [
        "whsec_QVBJLXNlY3JldC1rZXktYnl0ZXM=",
        "hv-api-7f3a9c",
        "whsec_U1RESU4tc2VjcmV0LWtleQ==",
        "hv-stdin-51d0e2",
        "whsec_QVJHLXNlY3JldA==",
        "hv-arg-c4b8aa",
    ];
    let never = json!({"sources": ["logscan"], "severities": ["critical"], "message": "^never$"});
    let (st, created) = http(
        &ns,
        "POST",
        "/api/v1/triggers",
        t,
        Some(
            json!({"name": "api", "url": "https://hooks.example.org/a", "secret": secrets[0],
                    "headers": {"x-api-key": secrets[1]}, "filter": never}),
        ),
    )?;
    ensure!(st == 201, "{st} {created}");
    cli_stdin(
        &ns,
        &cfg,
        &db,
        &[
            "triggers",
            "add",
            "--name",
            "stdin",
            "--url",
            "https://hooks.example.org/s",
            "--secret-file",
            "-",
            "--source",
            "logscan",
            "--severity",
            "critical",
        ],
        &format!("{}\n", secrets[2]),
    )?;
    let headers = dir.join("headers");
    std::fs::write(
        &headers,
        format!("# a comment\nx-team-key: {}\n", secrets[3]),
    )?;
    let out = cli(
        &ns,
        &cfg,
        &db,
        &[
            "triggers",
            "add",
            "--name",
            "headerfile",
            "--url",
            "https://hooks.example.org/h",
            "--header-file",
            headers.to_str().unwrap(),
            "--source",
            "logscan",
        ],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&headers)?;
    let out = cli(
        &ns,
        &cfg,
        &db,
        &[
            "triggers",
            "add",
            "--name",
            "args",
            "--url",
            "https://hooks.example.org/g",
            "--secret",
            secrets[4],
            "--header",
            &format!("x-arg={}", secrets[5]),
            "--source",
            "logscan",
        ],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The secrets are kept (in the private secrets file), so they are not simply lost.
    let secrets_file = dir.join("state/secrets.json");
    let kept = std::fs::read_to_string(&secrets_file)?;
    for s in secrets {
        ensure!(kept.contains(s), "secret {s} not kept");
    }
    ensure!(mode(&secrets_file)? == 0o600, "secrets file mode");

    // Every read path: API answers, every table in full, status, metrics, the log.
    let mut seen = vec![created];
    let (_, list) = http(&ns, "GET", "/api/v1/triggers", t, None)?;
    let listed: Value = serde_json::from_str(&list)?;
    ensure!(
        listed.as_array().map(Vec::len) == Some(4),
        "four triggers: {list}"
    );
    ensure!(
        listed[0]["headers"] == json!({"x-api-key": "********"})
            && listed[0]["secret"] == "********",
        "redacted: {}",
        listed[0]
    );
    seen.push(list);
    for id in listed.as_array().unwrap().iter().map(|t| t["id"].clone()) {
        seen.push(http(&ns, "GET", &format!("/api/v1/triggers/{id}"), t, None)?.1);
    }
    for path in ["/api/v1/stats", "/metrics", "/health"] {
        seen.push(http(&ns, "GET", path, t, None)?.1);
    }
    let (st, tables) = http(
        &ns,
        "POST",
        "/api/v1/sql",
        t,
        Some(json!({"sql": "SELECT * FROM duckdb_tables()"})),
    )?;
    ensure!(st == 200, "{tables}");
    seen.push(tables);
    for q in [
        "SELECT * FROM duckdb_columns()",
        "SELECT * FROM duckdb_settings()",
        "SELECT * FROM duckdb_views()",
    ] {
        seen.push(http(&ns, "POST", "/api/v1/sql", t, Some(json!({ "sql": q })))?.1);
    }
    let before = counts(&ns, &token)?;
    for table in before.keys() {
        let (st, body) = http(
            &ns,
            "POST",
            "/api/v1/sql",
            t,
            Some(json!({ "sql": format!("SELECT * FROM \"{table}\"") })),
        )?;
        ensure!(st == 200, "{table}: {st} {body}");
        seen.push(body);
    }
    let status = cli(&ns, &cfg, &db, &["status", "--json"])?;
    seen.push(String::from_utf8(status.stdout)?);
    let triggers_cli = cli(&ns, &cfg, &db, &["triggers", "list", "--json"])?;
    seen.push(String::from_utf8(triggers_cli.stdout)?);
    seen.push(std::fs::read_to_string(
        db.with_file_name("trail.duckdb.status.json"),
    )?);
    seen.push(agent.log_text());
    for s in secrets {
        for (i, text) in seen.iter().enumerate() {
            ensure!(
                !text.contains(s),
                "secret {s} readable in answer {i}: {text}"
            );
        }
    }
    ensure!(
        before["conntrack_events"] >= 12 && before["event_triggers"] == 4,
        "{before:?}"
    );

    // Hostile SQL over the API and through the CLI (which goes through the agent).
    let before_files = tree(dir.path())?;
    for (sql, refusal) in hostile(dir.path()) {
        let (st, body) = http(
            &ns,
            "POST",
            "/api/v1/sql",
            t,
            Some(json!({"sql": sql, "timeout_ms": 100})),
        )?;
        let e: Value = serde_json::from_str(&body).with_context(|| format!("{sql}: {body}"))?;
        let want = match refusal {
            Refusal::Parser => (400, "bad_request"),
            Refusal::NotAQuery => (403, "read_only"),
            Refusal::Engine => (400, "query_failed"),
        };
        ensure!(
            (st, e["error"].as_str().unwrap_or("")) == want,
            "{sql}: got {st} {body}, want {want:?}"
        );
        ensure!(!body.contains("root:"), "{sql} leaked /etc/shadow: {body}");
        let out = cli(&ns, &cfg, &db, &["sql", &sql])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains(want.1),
            "nattrail sql {sql}: {:?} {err}",
            out.status
        );
    }
    // A long query is interrupted at the timeout, preparation included.
    let started = Instant::now();
    let (st, body) = http(
        &ns,
        "POST",
        "/api/v1/sql",
        t,
        Some(
            json!({"sql": "SELECT count(*) FROM range(1000000000000::BIGINT) a, range(10) b", "timeout_ms": 100}),
        ),
    )?;
    ensure!(st == 408, "long query: {st} {body}");
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "not interrupted"
    );
    ensure!(counts(&ns, &token)? == before, "row counts changed");
    ensure!(tree(dir.path())? == before_files, "files appeared");

    // Legitimate queries answer exactly.
    for (sql, want) in legitimate(before["conntrack_events"]) {
        let (st, body) = http(&ns, "POST", "/api/v1/sql", t, Some(json!({ "sql": sql })))?;
        let v: Value = serde_json::from_str(&body)?;
        ensure!(
            st == 200 && v["rows"] == want,
            "{sql}: {st} {body}, want {want}"
        );
    }
    // Results are capped in bytes too (never cut silently).
    let (st, body) = http(
        &ns,
        "POST",
        "/api/v1/sql",
        t,
        Some(json!({"sql": "SELECT repeat('x', 1000) FROM range(20000)"})),
    )?;
    ensure!(
        st == 422 && body.contains("result_too_large"),
        "{st} {body}"
    );
    // The concurrency cap: two slow queries hold both slots, a third is turned away.
    let slow = |ns: String, token: String| {
        std::thread::spawn(move || {
            http(
                &ns,
                "POST",
                "/api/v1/sql",
                Some(&token),
                Some(
                    json!({"sql": "SELECT count(*) FROM range(1000000000000::BIGINT)", "timeout_ms": 3000}),
                ),
            )
        })
    };
    let (a, b) = (
        slow(ns.clone(), token.clone()),
        slow(ns.clone(), token.clone()),
    );
    std::thread::sleep(Duration::from_millis(800));
    let (st, body) = http(
        &ns,
        "POST",
        "/api/v1/sql",
        t,
        Some(json!({"sql": "SELECT 1"})),
    )?;
    ensure!(
        st == 429 && body.contains("busy"),
        "third query: {st} {body}"
    );
    for h in [a, b] {
        let (st, body) = h.join().expect("slow query thread")?;
        ensure!(st == 408, "slow query: {st} {body}");
    }

    // On the file, once the agent stopped: the same refusals, nothing changed.
    ensure!(agent.stop()?.success(), "agent exit");
    let on_file = |tables: &BTreeMap<String, u64>| -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for name in tables.keys() {
            let o = cli(
                &ns,
                &cfg,
                &db,
                &["sql", "--json", &format!("SELECT count(*) FROM \"{name}\"")],
            )?;
            ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: Value = serde_json::from_slice(&o.stdout)?;
            out.insert(name.clone(), v["rows"][0][0].as_u64().context("count")?);
        }
        Ok(out)
    };
    let at_stop = on_file(&before)?;
    let before_files = tree(dir.path())?;
    for (sql, refusal) in hostile(dir.path()) {
        let out = cli(&ns, &cfg, &db, &["sql", &sql])?;
        let err = String::from_utf8_lossy(&out.stderr);
        let needle = match refusal {
            Refusal::Parser => "Parser Error",
            Refusal::NotAQuery => "only one read-only query is allowed",
            Refusal::Engine => "DuckDB refused the query",
        };
        ensure!(
            !out.status.success() && err.contains(needle),
            "nattrail sql {sql} on the file: {:?} {err}",
            out.status
        );
    }
    for (sql, want) in legitimate(before["conntrack_events"]) {
        let out = cli(&ns, &cfg, &db, &["sql", "--json", sql])?;
        ensure!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(v["rows"] == want, "{sql} on the file: {v}, want {want}");
    }
    ensure!(
        tree(dir.path())? == before_files,
        "files appeared (file mode)"
    );
    ensure!(
        on_file(&before)? == at_stop,
        "row counts changed (file mode)"
    );
    server.stop()?;
    Ok(())
}

/// `sh -c 'umask 000; exec "$0" "$@"'`: the agent started under the loosest umask.
const UMASK_000: &[&str] = &["sh", "-c", "umask 000; exec \"$0\" \"$@\""];

#[test]
fn files_are_private_whatever_the_umask_and_exposed_tokens_are_refused() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 1,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let dir = Scratch::new("private")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let (db, cfg) = (dir.join("state/sub/trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[docker]\nenabled = false\n[api]\nlisten = \"\"\nsocket = \"{}\"\n",
            dir.join("run/api.sock").display()
        ),
    )?;
    let log = dir.join("agent.log");
    let agent = AgentProcess::start_wrapped(&bin(), &lab.gw_ns, UMASK_000, &cfg, &db, &log)?;
    // Let the writer commit (and create its WAL) and the status snapshot appear.
    std::thread::sleep(Duration::from_millis(2500));
    let state = dir.join("state");
    let wal = dir.join("state/sub/trail.duckdb.wal");
    for (p, want) in [
        (state.clone(), 0o700),
        (state.join("sub"), 0o700),
        (db.clone(), 0o600),
        (state.join("sub/api.token"), 0o600),
        (state.join("sub/trail.duckdb.status.json"), 0o600),
        (dir.join("run"), 0o750),
        (dir.join("run/api.sock"), 0o660),
    ] {
        ensure!(
            mode(&p)? == want,
            "{}: {:o}, want {want:o}",
            p.display(),
            mode(&p)?
        );
    }
    if wal.exists() {
        ensure!(mode(&wal)? == 0o600, "wal mode {:o}", mode(&wal)?);
    }
    ensure!(agent.stop()?.success(), "agent exit");
    ensure!(mode(&db)? == 0o600, "db after checkpoint");

    // A database given in a shared directory keeps the token out of it.
    let shared = dir.join("shared.duckdb");
    let agent = AgentProcess::start_wrapped(&bin(), &lab.gw_ns, UMASK_000, &cfg, &shared, &log)?;
    ensure!(
        !dir.join("api.token").exists() && dir.join("shared.duckdb.private/api.token").exists(),
        "token placed in a shared directory"
    );
    ensure!(
        mode(&dir.join("shared.duckdb.private"))? == 0o700,
        "private dir"
    );
    ensure!(agent.stop()?.success(), "agent exit");

    // Token files someone else could know are refused at start, with the reason.
    let token = state.join("sub/api.token");
    let refused = |why: &str| -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.gw_ns])
            .arg(bin())
            .arg("--config")
            .arg(&cfg)
            .arg("--db")
            .arg(&db)
            .arg("run")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains(why),
            "want a refusal naming {why:?}: {:?} {err}",
            out.status
        );
        Ok(())
    };
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644))?;
    refused("mode 0644")?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(&token, Some(65534), None)?;
    refused("owned by uid 65534")?;
    std::fs::remove_file(&token)?;
    let decoy = dir.join("decoy-token");
    std::fs::write(&decoy, "attacker-known-token\n")?;
    std::os::unix::fs::symlink(&decoy, &token)?;
    refused("symbolic link")?;
    Ok(())
}

/// Clients that trickle their headers fill the connection cap; the agent still answers a
/// token holder at once, and drops the trickling ones at the header timeout.
#[test]
fn slow_header_clients_do_not_lock_out_a_token_holder() -> Result<()> {
    let lab = NatLab::create(LabOptions {
        clients: 1,
        nat_ports: None,
        ipv6: false,
        short_timeouts: true,
    })?;
    let dir = Scratch::new("slowloris")?;
    let (db, cfg) = (dir.join("state/trail.duckdb"), dir.join("agent.toml"));
    std::fs::write(
        &cfg,
        "[conntrack]\nenabled = false\n[docker]\nenabled = false\n\
         [api]\nlisten = \"127.0.0.1:7466\"\nmax_connections = 8\nheader_timeout_ms = 3000\n",
    )?;
    let agent = AgentProcess::start(&bin(), &lab.gw_ns, &cfg, &db, &dir.join("agent.log"))?;
    let token = std::fs::read_to_string(dir.join("state/api.token"))?
        .trim()
        .to_string();
    let ns = lab.gw_ns.clone();
    // 40 connections, each sending a header line's first bytes and then nothing more.
    let slow = run_in(&ns, || {
        let mut v = Vec::new();
        for _ in 0..40 {
            let mut s = std::net::TcpStream::connect("127.0.0.1:7466")?;
            s.write_all(b"GET /api/v1/stats HTTP/1.1\r\nHost: x\r\nX-Slow: ")?;
            v.push(s);
        }
        Ok(v)
    })?;
    let started = Instant::now();
    let (st, body) = http(&ns, "GET", "/api/v1/stats", Some(&token), None)?;
    let took = started.elapsed();
    ensure!(
        st == 200,
        "token holder behind 40 slow clients: {st} {body}"
    );
    ensure!(
        took < Duration::from_secs(2),
        "the token holder waited {took:?} (the header timeout is 3 s)"
    );
    // Every slow connection is closed: evicted or timed out.
    std::thread::sleep(Duration::from_millis(3500));
    let mut closed = 0;
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(_) => closed += 1, // an error answer (408) and then the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(e) => bail!("a slow connection is still open: {e}"),
        }
    }
    ensure!(closed == 40, "{closed} of 40 slow connections closed");
    // The evictions are counted: 41 connections met a cap of 8.
    let (st, body) = http(&ns, "GET", "/api/v1/stats", Some(&token), None)?;
    let conns = &serde_json::from_str::<Value>(&body)?["agent"]["api"];
    ensure!(
        st == 200
            && conns["evicted"].as_u64() >= Some(33)
            && conns["accepted"].as_u64() >= Some(41),
        "connection counters: {st} {body}"
    );
    ensure!(agent.stop()?.success(), "agent exit");
    Ok(())
}
