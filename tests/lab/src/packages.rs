//! Installing the Debian packages the lab, the tests and the build need.

use std::process::Command;

use anyhow::{Result, bail};

/// Packages for the eBPF build, the NAT lab and the Docker tests.
pub const NEEDED: &[&str] = &[
    "clang",
    "libbpf-dev",
    "iproute2",
    "iptables",
    "conntrack",
    "docker.io",
    "busybox-static",
    // promtool, which lints the agent's /metrics in the API test.
    "prometheus",
    // The package test: cargo-deb's dpkg-shlibdeps, lintian, and a booted Debian.
    "dpkg-dev",
    "lintian",
    "debootstrap",
    "systemd-container",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs whichever of `pkgs` is missing (apt-get update first); a no-op when all are there.
pub fn ensure(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    let st = Command::new("apt-get").args(["update", "-qq"]).status()?;
    if !st.success() {
        bail!("apt-get update failed ({st})");
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !st.success() {
        bail!("apt-get install {} failed ({st})", missing.join(" "));
    }
    Ok(())
}
