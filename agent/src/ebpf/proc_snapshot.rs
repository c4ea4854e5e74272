//! The processes alive when the programs were attached, read from /proc: the exec program
//! reports only what starts later. Taken after attaching, so no process falls between the
//! snapshot and the live records (one may appear in both). /proc is hostile input like any
//! other: every field is parsed with bounds and a process that vanishes midway is skipped.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::event::{ARGV_LEN, arguments};
use crate::pipeline::process::ProcessExec;

/// Fields 4 (ppid) and 22 (start time in clock ticks since boot) of /proc/PID/stat; the
/// command name in parentheses may itself hold spaces and parentheses.
fn stat_fields(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // After the name: state (3), ppid (4), ... starttime (22).
    let ppid = f.nth(1)?.parse().ok()?;
    let start = f.nth(17)?.parse().ok()?;
    Some((ppid, start))
}

fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ns_inode(dir: &Path, ns: &str) -> u32 {
    std::fs::metadata(dir.join("ns").join(ns)).map_or(0, |m| m.ino() as u32)
}

/// One process, or None when it is a kernel thread or gone.
fn process(
    dir: &Path,
    pid: u32,
    now_ns: u64,
    boot_to_wall_ns: i128,
    tick_ns: u64,
) -> Option<ProcessExec> {
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    if cmdline.is_empty() {
        return None;
    }
    let (ppid, start_ticks) = stat_fields(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let uid = real_uid(&std::fs::read_to_string(dir.join("status")).ok()?)?;
    let comm = std::fs::read_to_string(dir.join("comm"))
        .unwrap_or_default()
        .trim_end()
        .to_string();
    let argv_truncated = cmdline.len() > ARGV_LEN;
    let argv = arguments(&cmdline[..cmdline.len().min(ARGV_LEN)]);
    let filename = std::fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let start_boot = i128::from(start_ticks.saturating_mul(tick_ns));
    Some(ProcessExec {
        snapshot: true,
        ts_ns: now_ns,
        pid,
        tid: pid,
        ppid,
        uid,
        comm,
        filename,
        filename_truncated: false,
        argv,
        argv_truncated,
        start_ns: (start_boot + boot_to_wall_ns).clamp(0, i128::from(u64::MAX)) as u64,
        cgroup_id: 0,
        netns: ns_inode(dir, "net"),
        mntns: ns_inode(dir, "mnt"),
    })
}

/// The user-space processes under `proc` now.
pub fn snapshot(proc: &Path, now_ns: u64, boot_to_wall_ns: i128) -> Vec<ProcessExec> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as u64;
    let tick_ns = 1_000_000_000 / ticks;
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            process(&e.path(), pid, now_ns, boot_to_wall_ns, tick_ns)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_hostile_names_parse() {
        let line = "42 (a) b (c) S 7 42 42 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 1 0 12345 1 1";
        assert_eq!(stat_fields(line), Some((7, 12345)));
        assert_eq!(stat_fields("42 (x"), None);
        assert_eq!(stat_fields("42 (x) S"), None);
    }

    #[test]
    fn this_process_is_in_the_snapshot() {
        let me = std::process::id();
        let all = snapshot(Path::new("/proc"), 1, 0);
        let found = all.iter().find(|p| p.pid == me).expect("this process");
        assert!(found.snapshot && !found.argv.is_empty() && found.ppid > 0);
        assert_eq!(found.uid, nix::unistd::getuid().as_raw());
    }
}
