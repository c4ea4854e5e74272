//! The socket helper (`helpers/nt-sockets.c`): opens flows by TCP connect, connected UDP or
//! unconnected `sendto`, one socket each. Built static with clang, so the same file runs on
//! the host and in a busybox container.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const SOURCE: &str = include_str!("../helpers/nt-sockets.c");

/// Builds the helper into `dir` and returns its path.
pub fn build(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("nt-sockets.c");
    let bin = dir.join("nt-sockets");
    std::fs::write(&src, SOURCE)?;
    let out = Command::new("clang")
        .args(["-O2", "-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running clang")?;
    if !out.status.success() {
        bail!(
            "building the socket helper: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bin)
}

/// The source ports a run printed.
pub fn ports(stdout: &str) -> Result<Vec<u16>> {
    stdout
        .lines()
        .map(|l| l.trim().parse::<u16>().context("a port from the helper"))
        .collect()
}
