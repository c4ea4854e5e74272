//! The .deb: the files generated from the binary (`nattrail generate`), then cargo-deb.
//! Shared by `cargo xtask deb` and the booted install test.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::packages;

/// The cargo-deb release the package is built with (installed into ~/.cargo/bin when
/// missing: outside the clone, so it is built once per machine).
const CARGO_DEB: &str = "3.8.0";

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Installs cargo-deb and what it calls (dpkg-shlibdeps computes the dependencies).
pub fn ensure_tools() -> Result<()> {
    packages::ensure(&["dpkg-dev", "binutils", "gzip"])?;
    let have = cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB));
    if !have {
        eprintln!("installing cargo-deb {CARGO_DEB}");
        run(cargo().args(["install", "--locked", "cargo-deb", "--version", CARGO_DEB]))?;
    }
    Ok(())
}

/// Builds the .deb of the release binary `binary` (already built in `target_dir`) into
/// `out_dir`; `version` overrides the Debian version (an upgrade test's newer package).
/// Returns the .deb's path.
pub fn build_deb(
    root: &Path,
    target_dir: &Path,
    binary: &Path,
    version: Option<&str>,
    out_dir: &Path,
) -> Result<PathBuf> {
    ensure_tools()?;
    // cargo-deb takes assets under target/release/ from the real target directory.
    let gen_dir = target_dir.join("release").join("packaging");
    if gen_dir.exists() {
        std::fs::remove_dir_all(&gen_dir)
            .with_context(|| format!("clearing {}", gen_dir.display()))?;
    }
    let generate = |what: &str, dir: &Path| -> Result<()> {
        run(Command::new(binary)
            .args(["generate", what, "--out"])
            .arg(dir))
        .map(|_| ())
    };
    generate("config", &gen_dir)?;
    generate("man", &gen_dir.join("man"))?;
    generate("completions", &gen_dir.join("completions"))?;
    for page in std::fs::read_dir(gen_dir.join("man"))? {
        // -n: no name or time stamp inside, so rebuilds give the same bytes.
        run(Command::new("gzip").args(["-9", "-n"]).arg(page?.path()))?;
    }
    std::fs::create_dir_all(out_dir)?;
    let mut cmd = cargo();
    cmd.current_dir(root)
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["deb", "-p", "nattrail", "--no-build", "--output"])
        .arg(out_dir);
    if let Some(v) = version {
        cmd.args(["--deb-version", v]);
    }
    let out = run(&mut cmd)?;
    let path = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .context("cargo-deb printed no .deb path")?;
    Ok(PathBuf::from(path))
}
