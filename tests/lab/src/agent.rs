//! The real `nattrail run` process inside the lab's gateway namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running agent.
pub struct AgentProcess {
    child: Option<Child>,
    /// Its log (stderr).
    pub log: PathBuf,
}

/// Where cargo put the `nattrail` binary, for callers outside the agent package (xtask).
pub fn built_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/nattrail-target"));
    target.join("release").join("nattrail")
}

/// Runs a `binary --config config --db db args` command (in namespace `ns` if given) to its
/// end. Backtraces are off: a refused command's stderr is its message.
pub fn cli_output(
    binary: &Path,
    ns: Option<&str>,
    config: &Path,
    db: &Path,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    cmd.arg("--config")
        .arg(config)
        .arg("--db")
        .arg(db)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .with_context(|| format!("running nattrail {args:?}"))
}

/// Like [`cli_output`], for a command that must succeed: its stdout, or an error with its
/// stderr.
pub fn cli(
    binary: &Path,
    ns: Option<&str>,
    config: &Path,
    db: &Path,
    args: &[&str],
) -> Result<String> {
    let out = cli_output(binary, ns, config, db, args)?;
    if !out.status.success() {
        bail!(
            "nattrail {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

impl AgentProcess {
    /// Starts `binary run --config config --db db` in namespace `ns`, logging to `log`, and
    /// waits until it reports that it is running (subscribed and dumped).
    pub fn start(binary: &Path, ns: &str, config: &Path, db: &Path, log: &Path) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(binary);
        Self::spawn(cmd, binary, config, db, log)
    }

    /// Like [`AgentProcess::start`], but entering only the network namespace (`nsenter`):
    /// `ip netns exec` also gives the agent a fresh /sys without the cgroup hierarchy, where
    /// the socket programs attach.
    pub fn start_keeping_mounts(
        binary: &Path,
        ns: &str,
        config: &Path,
        db: &Path,
        log: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}")).arg(binary);
        Self::spawn(cmd, binary, config, db, log)
    }

    /// Like [`AgentProcess::start`], with the agent run by `wrapper` (e.g. `setpriv` with
    /// its options, or `sh -c 'umask 000; exec "$0" "$@"'`), which must exec it.
    pub fn start_wrapped(
        binary: &Path,
        ns: &str,
        wrapper: &[&str],
        config: &Path,
        db: &Path,
        log: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(wrapper).arg(binary);
        Self::spawn(cmd, binary, config, db, log)
    }

    /// Starts the agent in the host's own namespaces (the Docker tests: dockerd's socket and
    /// containers are the host's).
    pub fn start_on_host(binary: &Path, config: &Path, db: &Path, log: &Path) -> Result<Self> {
        Self::spawn(Command::new(binary), binary, config, db, log)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    fn spawn(
        mut cmd: Command,
        binary: &Path,
        config: &Path,
        db: &Path,
        log: &Path,
    ) -> Result<Self> {
        let logf =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--db")
            .arg(db)
            .env("NATTRAIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut agent = AgentProcess {
            child: Some(child),
            log: log.to_path_buf(),
        };
        agent.wait_for_log("nattrail running", Duration::from_secs(60))?;
        Ok(agent)
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(st) = child.try_wait()?
            {
                bail!("agent exited ({st}) before logging {needle:?}; log:\n{text}");
            }
            if Instant::now() > deadline {
                bail!("agent did not log {needle:?} within {timeout:?}; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit. On any failure `Drop` kills and reaps it.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let pid = self.child.as_ref().expect("agent running").id();
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.as_mut().expect("agent running").try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not stop within 60 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
