//! The query commands on a closed standard output (`nattrail flows | head`): the reader went
//! away, so the command ends quietly with status 0, in every output format, instead of
//! printing "Error: Broken pipe" or panicking in `println!`. With the pipe open, the same
//! commands print every row asked for.

// Only the generator is needed here, not the lookups beside it.
#[allow(dead_code)]
#[path = "support/gen_trail.rs"]
mod gen_trail;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Result, ensure};
use gen_trail::GenConfig;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nattrail"))
}

/// The command on the test's trail, with an empty config so that no installed one applies.
fn nattrail(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("--config")
        .arg(dir.join("empty.toml"))
        .arg("--db")
        .arg(dir.join("t.duckdb"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("NATTRAIL_LOG");
    c
}

#[test]
fn a_closed_stdout_ends_query_commands_quietly() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("nattrail-cliout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("empty.toml"), "")?;
    let cfg = GenConfig {
        flows: 20_000,
        case_every: 1_000,
        max_cases: 20,
        ..Default::default()
    };
    let (writer, _, cases) = gen_trail::write_trail(&dir.join("t.duckdb"), &cfg)?;
    writer.finish()?;

    let listings: [&[&str]; 4] = [
        &["flows", "--limit", "5000", "--json"],
        &["flows", "--limit", "5000", "--format", "csv"],
        &["flows", "--limit", "5000"],
        &["sql", "SELECT * FROM flows LIMIT 5000"],
    ];
    // With a reader: every row comes out.
    let out = nattrail(&dir, listings[0]).output()?;
    ensure!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    ensure!(
        rows.len() == 5000,
        "{} flows printed, 5000 asked",
        rows.len()
    );
    let out = nattrail(&dir, listings[1]).output()?;
    ensure!(out.status.success(), "{out:?}");
    let lines = out.stdout.iter().filter(|b| **b == b'\n').count();
    ensure!(
        lines == 5001,
        "{lines} CSV lines, a header and 5000 rows expected"
    );

    // Without one: status 0, nothing on stderr.
    let case = &cases[0];
    let at = chrono::DateTime::from_timestamp_nanos(case.at_ns as i64).to_rfc3339();
    let (ip, port) = (case.public.0.to_string(), case.public.1.to_string());
    let who: &[&str] = &["who", "--ip", &ip, "--port", &port, "--at", &at];
    for args in listings.iter().copied().chain([who]) {
        let mut child = nattrail(&dir, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Close the only reader before the command has opened the trail, let alone written:
        // its first write to stdout fails with EPIPE, whatever the timing.
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        ensure!(
            out.status.code() == Some(0) && out.stderr.is_empty(),
            "nattrail {args:?} on a closed stdout: {}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
