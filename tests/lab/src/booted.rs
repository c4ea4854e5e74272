//! A Debian 12 system booted with systemd as PID 1 under `systemd-nspawn --boot`, for the
//! package test. Its root file system comes from debootstrap, once per machine: cached
//! outside the clone (as the target directory is) and copied for each boot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::packages;

/// The pristine root file system, kept between runs.
pub const ROOTFS_CACHE: &str = "/var/cache/nattrail-test/bookworm";
/// What the booted system has besides the minimal base: systemd to boot, the tools the test
/// runs inside (iptables for the MASQUERADE, man), and the package's recommends (conntrack)
/// so that `apt install ./nattrail_*.deb` needs no network.
const INCLUDE: &str =
    "systemd,systemd-sysv,dbus,iptables,iproute2,man-db,procps,adduser,conntrack,busybox";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The cached root file system, made with debootstrap when missing or made for another
/// package list.
pub fn rootfs() -> Result<PathBuf> {
    packages::ensure(&["debootstrap", "systemd-container"])?;
    let cache = Path::new(ROOTFS_CACHE);
    let marker = cache.join(".nattrail-include");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == INCLUDE) {
        return Ok(cache.to_path_buf());
    }
    let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Some(parent) = cache.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let t = Instant::now();
    eprintln!(
        "debootstrap bookworm into {} (once per machine)",
        tmp.display()
    );
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            "bookworm",
        ])
        .arg(&tmp)
        .arg(MIRROR)
        .output()
        .context("running debootstrap")?;
    if !out.status.success() {
        bail!(
            "debootstrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    std::fs::write(tmp.join(".nattrail-include"), INCLUDE)?;
    let _ = std::fs::remove_dir_all(cache);
    std::fs::rename(&tmp, cache)?;
    eprintln!("debootstrap took {:.0} s", t.elapsed().as_secs_f64());
    Ok(cache.to_path_buf())
}

/// A booted system; dropped, it is killed with everything in it.
pub struct Booted {
    nspawn: Child,
    leader: u32,
}

impl Booted {
    /// Copies `rootfs` to `root` and boots it in a network namespace of its own, taking the
    /// host-side interfaces `ifaces` into it, and `binds` (host path, path inside) read-only.
    pub fn boot(
        rootfs: &Path,
        root: &Path,
        ifaces: &[&str],
        binds: &[(&Path, &str)],
    ) -> Result<Booted> {
        crate::sh(&[
            "cp",
            "-a",
            &rootfs.display().to_string(),
            &root.display().to_string(),
        ])?;
        let mut args = vec![
            "--boot".to_string(),
            format!("--directory={}", root.display()),
            "--private-network".into(),
            "--register=no".into(),
            "--keep-unit".into(),
            "--console=pipe".into(),
            "--machine=ntpkg".into(),
            // nspawn's default capability set and system-call filter lack what the service's
            // eBPF programs need (its own seccomp filter answers bpf() with EPERM).
            "--capability=CAP_BPF,CAP_PERFMON".into(),
            "--system-call-filter=bpf".into(),
        ];
        args.extend(ifaces.iter().map(|i| format!("--network-interface={i}")));
        args.extend(
            binds
                .iter()
                .map(|(from, to)| format!("--bind-ro={}:{to}", from.display())),
        );
        // nspawn waits for udev to initialise a moved interface when /sys is writable; no
        // udev runs on this host, so it sees /sys read-only, in a mount namespace of its own.
        let script = format!(
            "mount -o remount,bind,ro /sys && exec systemd-nspawn {}",
            args.join(" ")
        );
        let nspawn = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting systemd-nspawn")?;
        let mut booted = Booted { nspawn, leader: 0 };
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = booted.nspawn.id();
        while booted.leader == 0 {
            if let Some(st) = booted.nspawn.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = booted.nspawn.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err)?;
                }
                bail!("systemd-nspawn exited ({st}): {err}");
            }
            // nspawn's helper children come and go; the container's init is systemd.
            booted.leader = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/comm"))
                        .is_ok_and(|comm| comm.trim() == "systemd")
                })
                .unwrap_or(0);
            if Instant::now() > deadline {
                bail!("the container's init did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        loop {
            let (_, state) = booted.run("systemctl is-system-running --wait")?;
            match state.trim() {
                "running" => return Ok(booted),
                "degraded" => {
                    let (_, failed) = booted.run("systemctl --failed --no-pager --plain")?;
                    bail!("the booted system is degraded:\n{failed}");
                }
                _ if Instant::now() > deadline => bail!("boot did not finish: {state}"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Runs `script` with sh inside the system, as root; its exit code and standard output
    /// (standard error appended).
    pub fn run(&self, script: &str) -> Result<(i32, String)> {
        let out = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .output()
            .with_context(|| format!("running {script:?} in the booted system"))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// Runs `script` inside and fails unless it succeeds; its output.
    pub fn sh(&self, script: &str) -> Result<String> {
        let (code, out) = self.run(script)?;
        if code != 0 {
            bail!("`{script}` failed in the booted system (exit {code}):\n{out}");
        }
        Ok(out)
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // The container's init: killing it ends its PID namespace, and nspawn with it.
        if self.leader != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.leader as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}
