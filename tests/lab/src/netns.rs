//! Running code inside a network namespace from a thread of this process.

use std::fs::File;

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

/// Runs `f` on a new thread that has entered network namespace `ns` (by `ip netns` name).
/// Threads that `f` spawns inherit the namespace; sockets keep it for their lifetime.
pub fn run_in<F, R>(ns: &str, f: F) -> Result<R>
where
    F: FnOnce() -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    spawn_in(ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
}

/// Starts `f` on a thread inside `ns` and returns its handle without waiting.
pub fn spawn_in<F, R>(ns: &str, f: F) -> Result<std::thread::JoinHandle<Result<R>>>
where
    F: FnOnce() -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || -> Result<R> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            f()
        })
        .context("spawning a namespace thread")
}
