//! Process memory, for tests and benchmarks that state a budget.

/// Peak resident set size (VmHWM) of process `pid`, in MiB; 0 if unreadable.
pub fn peak_rss_mib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Peak resident set size of this process, in MiB; 0 if unreadable.
pub fn peak_rss_mib() -> u64 {
    peak_rss_mib_of("self")
}
