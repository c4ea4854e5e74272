//! The lab starts dockerd on a machine whose last dockerd was killed, leaving pid files that
//! name processes which are not dockerd or containerd (a machine restored from a snapshot).

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use nattrail_lab::docker;

const DOCKERD_PID: &str = "/var/run/docker.pid";
const CONTAINERD_PID: &str = "/var/run/docker/containerd/containerd.pid";

fn comm(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Stops dockerd, writes the pid of a live `sleep` into `files`, and starts dockerd again.
fn start_over(files: &[&str]) -> Result<()> {
    docker::stop_dockerd()?;
    // A live process that is neither: dockerd would take it for its own or its containerd.
    let mut stranger = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .context("starting sleep")?;
    let pid = stranger.id().to_string();
    let started = (|| -> Result<()> {
        for f in files {
            std::fs::write(f, &pid)?;
        }
        docker::ensure_dockerd()
    })();
    let still_running = stranger.try_wait()?.is_none();
    stranger.kill()?;
    stranger.wait()?;
    started.with_context(|| format!("starting dockerd over {files:?} naming sleep {pid}"))?;
    ensure!(still_running, "the stranger process was killed");
    assert_eq!(comm(&std::fs::read_to_string(DOCKERD_PID)?), "dockerd");
    assert_eq!(
        comm(&std::fs::read_to_string(CONTAINERD_PID)?),
        "containerd"
    );
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()?;
    assert!(info.status.success(), "docker info failed: {info:?}");
    Ok(())
}

#[test]
fn dockerd_starts_over_pid_files_naming_other_processes() -> Result<()> {
    docker::ensure_dockerd()?;
    // What CI met: dockerd waited 20 s for a containerd that was not there and exited.
    start_over(&[CONTAINERD_PID])?;
    // dockerd refuses outright to start over its own pid file naming a live process.
    start_over(&[DOCKERD_PID, CONTAINERD_PID])?;
    Ok(())
}
