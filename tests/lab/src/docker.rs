//! The Docker side of the lab: dockerd (Debian's docker.io) started when not running, and a
//! tiny image imported from a rootfs holding Debian's static busybox (there is no registry).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh;

/// The image the tests run.
pub const IMAGE: &str = "nattrail-busybox:lab";
/// Where a dockerd we start logs.
const DOCKERD_LOG: &str = "/var/tmp/nattrail-dockerd.log";
/// busybox applets the tests use.
const APPLETS: &[&str] = &[
    "sh", "echo", "sleep", "seq", "printf", "yes", "head", "cat", "tr", "dd", "true",
];

fn answering() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pid files dockerd and its containerd leave behind when killed (a machine stopped or
/// restored from a snapshot). dockerd trusts any live process under that pid: on a machine whose
/// pids were reused it waits for a containerd that is not there and gives up after 20 s.
const PID_FILES: &[(&str, &str)] = &[
    ("/var/run/docker.pid", "dockerd"),
    ("/var/run/docker/containerd/containerd.pid", "containerd"),
];

/// Removes each of [`PID_FILES`] whose pid is not a live process of the expected name.
fn remove_stale_pid_files() -> Result<()> {
    for (path, name) in PID_FILES {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let owner = text
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|&pid| alive(pid))
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok());
        if owner.as_deref().map(str::trim) != Some(*name) {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale pid file {path}"))?;
        }
    }
    Ok(())
}

/// The last `n` lines of the dockerd log, for an error message.
fn log_tail(n: usize) -> String {
    let text = std::fs::read_to_string(DOCKERD_LOG).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts dockerd unless one answers; waits until it does.
pub fn ensure_dockerd() -> Result<()> {
    if answering() {
        return Ok(());
    }
    remove_stale_pid_files()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(DOCKERD_LOG)
        .with_context(|| format!("opening {DOCKERD_LOG}"))?;
    let mut child = Command::new("dockerd")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd (is docker.io installed?)")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answering() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "dockerd exited ({status}) before answering; the end of {DOCKERD_LOG}:\n{}",
                log_tail(20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "dockerd did not answer within 60 s; the end of {DOCKERD_LOG}:\n{}",
                log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn dockerd_pid() -> Option<i32> {
    let out = Command::new("pidof").arg("dockerd").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether process `pid` still runs. A dockerd this process (or xtask, which runs the tests)
/// started stays a zombie after it exits until its parent reaps it, so a zombie counts as
/// stopped; our own child is reaped here.
fn alive(pid: i32) -> bool {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Stops the running dockerd (its containers die with it) and waits until it has exited.
pub fn stop_dockerd() -> Result<()> {
    let pid = dockerd_pid().context("no dockerd process to stop")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("dockerd {pid} did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Stops dockerd (its containers die with it) and starts it again.
pub fn restart_dockerd() -> Result<()> {
    stop_dockerd()?;
    ensure_dockerd()
}

/// Imports the busybox image unless it is there.
pub fn ensure_image() -> Result<()> {
    if sh(&["docker", "image", "inspect", IMAGE]).is_ok() {
        return Ok(());
    }
    let root = std::env::temp_dir().join(format!("nattrail-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (is busybox-static installed?)")?;
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let st = Command::new("docker")
        .args(["import", "-", IMAGE])
        .stdin(tar.stdout.context("tar's output")?)
        .stdout(Stdio::null())
        .status()
        .context("running docker import")?;
    let _ = std::fs::remove_dir_all(&root);
    if !st.success() {
        bail!("docker import failed ({st})");
    }
    Ok(())
}

/// Runs a detached container named `name` with `script` as its shell command.
pub fn run(name: &str, tty: bool, script: &str) -> Result<String> {
    let _ = sh(&["docker", "rm", "-f", name]);
    let mut args = vec!["docker", "run", "-d", "--name", name];
    if tty {
        args.push("-t");
    }
    args.extend([IMAGE, "sh", "-c", script]);
    Ok(sh(&args)?.trim().to_string())
}

/// Waits until container `name` has exited.
pub fn wait_exited(name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = sh(&["docker", "inspect", "-f", "{{.State.Running}}", name])?;
        if state.trim() == "false" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("container {name} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every line container `name` logged, with Docker's timestamps: (ts, stream, text).
pub fn logs(name: &str) -> Result<Vec<(String, String)>> {
    let out = Command::new("docker")
        .args(["logs", "--timestamps", name])
        .output()
        .context("running docker logs")?;
    let mut lines = Vec::new();
    for (bytes, stream) in [(&out.stdout, "stdout"), (&out.stderr, "stderr")] {
        for l in String::from_utf8_lossy(bytes).lines() {
            if let Some((ts, text)) = l.split_once(' ') {
                lines.push((format!("{stream} {ts}"), text.to_string()));
            }
        }
    }
    Ok(lines)
}
