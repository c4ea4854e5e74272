//! The eBPF process programs on the real kernel: every process started by a shell loop on
//! the host, by `docker exec` and by a shell loop inside a container is in `process_events`
//! with its arguments; a process's fork, exec and exit are there with its parent and exit
//! status; a burst of 20,000 execs is recorded whole, or the shortfall is the `ebpf` gaps'
//! lost count.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use nattrail::store::schema::open_ro;
use nattrail_lab::agent::AgentProcess;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::{docker, sh};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

const BURST: u64 = 20_000;

/// kind, ppid, argv[3], wait_status of one process_events row.
type LifeRow = (u8, Option<u32>, Option<String>, Option<u32>);

#[test]
fn executions_on_the_host_and_in_containers_are_recorded_with_their_arguments() -> Result<()> {
    docker::ensure_dockerd()?;
    docker::ensure_image()?;
    let dir = Scratch::new("ebpf-exec")?;
    let (db, cfg, log) = (
        dir.join("trail.duckdb"),
        dir.join("agent.toml"),
        dir.join("agent.log"),
    );
    std::fs::write(
        &cfg,
        "[conntrack]\nenabled = false\n[docker]\nenabled = false\n[api]\nenabled = false\n\
         [webhooks]\nenabled = false\n[store]\ncommit_interval_ms = 100\n",
    )?;
    let tag = format!("ntx{}", std::process::id());
    // Alive before the agent starts: found by its /proc snapshot.
    let mut before = std::process::Command::new("sh")
        .args(["-c", &format!("sleep 60; : {tag}-snap")])
        .spawn()?;
    let mut agent = AgentProcess::start_on_host(&bin(), &cfg, &db, &log)?;
    agent.wait_for_log("eBPF exec program attached", Duration::from_secs(10))?;

    // One process from its fork to its exit status.
    let child = std::process::Command::new("sh")
        .args(["-c", &format!("exit 7 # {tag}-life")])
        .spawn()?;
    let child_pid = child.id();
    let status = child.wait_with_output()?.status;
    ensure!(status.code() == Some(7), "the child's exit: {status}");

    // A shell loop on the host.
    sh(&[
        "sh",
        "-c",
        &format!("for i in $(seq 1 50); do /bin/echo {tag}-loop-$i >/dev/null; done"),
    ])?;
    // docker exec, and a shell loop inside the container.
    let name = format!("ntl-exec-{}", std::process::id());
    docker::run(&name, false, "sleep 120")?;
    for i in 1..=10 {
        sh(&[
            "docker",
            "exec",
            &name,
            "/bin/echo",
            &format!("{tag}-dexec-{i}"),
        ])?;
    }
    sh(&[
        "docker",
        "exec",
        &name,
        "sh",
        "-c",
        &format!("for i in $(seq 1 20); do /bin/echo {tag}-cloop-$i >/dev/null; done"),
    ])?;
    let _ = sh(&["docker", "rm", "-f", &name]);
    // A secret on nattrail's own command line (discouraged, but accepted) is never stored.
    let _ = std::process::Command::new(bin())
        .arg("--db")
        .arg(dir.join("other.duckdb"))
        .args([
            "triggers",
            "add",
            "--name",
            "t",
            "--url",
            "https://hooks.example.org/x",
            "--secret",
            &format!("whsec_{tag}"),
            "--header",
            &format!("x-k={tag}-hv"),
            "--source",
            "logscan",
        ])
        .output()?;
    // The burst.
    let t = Instant::now();
    sh(&[
        "sh",
        "-c",
        &format!("i=0; while [ $i -lt {BURST} ]; do /bin/true {tag}-burst; i=$((i+1)); done"),
    ])?;
    let burst_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(agent.stop()?.success(), "agent exit");

    let conn = open_ro(&db)?;
    let args_like = |kind: &str| -> Result<Vec<(String, String, u32)>> {
        let mut st = conn.prepare(
            "SELECT argv[2], filename, mntns FROM process_events \
             WHERE argv[2] LIKE ? ORDER BY ts",
        )?;
        let rows = st
            .query_map([format!("{tag}-{kind}-%")], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    };
    let host_mnt = std::fs::metadata("/proc/self/ns/mnt")?.ino() as u32;
    let numbered = |rows: &[(String, String, u32)], kind: &str, n: u32| {
        let mut got: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        got.sort();
        let mut want: Vec<String> = (1..=n).map(|i| format!("{tag}-{kind}-{i}")).collect();
        want.sort();
        assert_eq!(got, want, "{kind}: the execs recorded");
    };
    let loop_rows = args_like("loop")?;
    numbered(&loop_rows, "loop", 50);
    ensure!(
        loop_rows
            .iter()
            .all(|r| r.1 == "/bin/echo" && r.2 == host_mnt),
        "host loop: {loop_rows:?}"
    );
    for (kind, n) in [("dexec", 10), ("cloop", 20)] {
        let rows = args_like(kind)?;
        numbered(&rows, kind, n);
        ensure!(
            rows.iter().all(|r| r.1 == "/bin/echo" && r.2 != host_mnt),
            "{kind}: in the container's mount namespace: {rows:?}"
        );
    }
    let masked: (u64, u64) = conn.query_row(
        "SELECT count(*) FILTER (WHERE list_contains(argv, '********'))::UBIGINT,
                count(*) FILTER (WHERE array_to_string(argv, ' ') LIKE '%' || ? || '%')::UBIGINT
         FROM process_events WHERE list_contains(argv, 'triggers')",
        [format!("whsec_{tag}")],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let header_leaks: u64 = conn.query_row(
        "SELECT count(*)::UBIGINT FROM process_events WHERE array_to_string(argv, ' ') LIKE ?",
        [format!("%{tag}-hv%")],
        |r| r.get(0),
    )?;
    ensure!(
        masked.0 >= 1 && masked.1 == 0 && header_leaks == 0,
        "the trigger command: {} masked rows, secret in {} rows, header in {header_leaks}",
        masked.0,
        masked.1
    );
    let life: Vec<LifeRow> = conn
        .prepare(
            "SELECT kind, ppid, argv[3], wait_status FROM process_events WHERE pid = ?
             ORDER BY ts, kind",
        )?
        .query_map([child_pid], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let me = std::process::id();
    ensure!(
        life == [
            (2, Some(me), None, None),
            (1, Some(me), Some(format!("exit 7 # {tag}-life")), None),
            (3, None, None, Some(7 << 8)),
        ],
        "the child's fork, exec and exit: {life:?}"
    );
    let snap: Vec<(u8, u32)> = conn
        .prepare("SELECT kind, pid FROM process_events WHERE argv[3] = ?")?
        .query_map([format!("sleep 60; : {tag}-snap")], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    ensure!(
        snap == [(0, before.id())],
        "the process alive before the start: {snap:?}"
    );
    let _ = before.kill();
    let _ = before.wait();
    let recorded: u64 = conn.query_row(
        "SELECT count(*)::UBIGINT FROM process_events WHERE argv[2] = ?",
        [format!("{tag}-burst")],
        |r| r.get(0),
    )?;
    let lost: u64 = conn.query_row(
        "SELECT coalesce(sum(lost), 0)::UBIGINT FROM capture_gaps WHERE source = 'ebpf'",
        [],
        |r| r.get(0),
    )?;
    println!(
        "burst of {BURST} execs in {burst_secs:.1} s ({:.0}/s): {recorded} recorded, {lost} lost by the ring buffer",
        BURST as f64 / burst_secs
    );
    ensure!(
        recorded == BURST || (recorded < BURST && recorded + lost >= BURST),
        "{recorded} recorded + {lost} lost does not account for {BURST} execs"
    );
    Ok(())
}
