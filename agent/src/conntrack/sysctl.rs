//! The conntrack sysctls the trail depends on, set at start (per network namespace).

use std::fs;
use std::io;
use std::path::PathBuf;

use tracing::info;

/// Errors of reading or writing a sysctl.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The file under /proc/sys could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// "reading" or "writing".
        action: &'static str,
        /// The /proc/sys path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

/// One setting and its wanted value.
#[derive(Debug, Clone)]
pub struct Setting {
    /// Dotted sysctl name, e.g. `net.netfilter.nf_conntrack_events`.
    pub name: &'static str,
    /// Value to write.
    pub want: &'static str,
}

/// A setting as found and as left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Dotted sysctl name.
    pub name: &'static str,
    /// Value before we touched it.
    pub before: String,
    /// Value now.
    pub after: String,
}

/// Which of the three settings to enforce (each can be switched off in config).
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    /// `nf_conntrack_events=1`: DESTROY for every flow, not only those seen at creation.
    pub events: bool,
    /// `nf_conntrack_acct=1`: byte and packet counters.
    pub acct: bool,
    /// `nf_conntrack_timestamp=1`: exact kernel start/stop times.
    pub timestamp: bool,
}

fn path_of(name: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(name.replace('.', "/"))
}

/// Reads a sysctl's current value.
pub fn read(name: &str) -> Result<String, SysctlError> {
    let path = path_of(name);
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysctlError::Io {
            action: "reading",
            path: path.display().to_string(),
            source,
        })
}

/// Writes a sysctl.
pub fn write(name: &str, value: &str) -> Result<(), SysctlError> {
    let path = path_of(name);
    fs::write(&path, value).map_err(|source| SysctlError::Io {
        action: "writing",
        path: path.display().to_string(),
        source,
    })
}

impl Wanted {
    /// The settings this selection enforces.
    pub fn settings(self) -> Vec<Setting> {
        let mut v = Vec::new();
        if self.events {
            v.push(Setting {
                name: "net.netfilter.nf_conntrack_events",
                want: "1",
            });
        }
        if self.acct {
            v.push(Setting {
                name: "net.netfilter.nf_conntrack_acct",
                want: "1",
            });
        }
        if self.timestamp {
            v.push(Setting {
                name: "net.netfilter.nf_conntrack_timestamp",
                want: "1",
            });
        }
        v
    }

    /// Sets every wanted value, logging each one that changed.
    pub fn apply(self) -> Result<Vec<Applied>, SysctlError> {
        let mut out = Vec::new();
        for s in self.settings() {
            let before = read(s.name)?;
            if before != s.want {
                write(s.name, s.want)?;
                info!(sysctl = s.name, before = %before, after = s.want, "changed kernel setting");
            }
            out.push(Applied {
                name: s.name,
                before,
                after: s.want.to_string(),
            });
        }
        Ok(out)
    }
}

/// Puts back the values found at start (for `[conntrack] restore_sysctls = true`).
pub fn restore(applied: &[Applied]) {
    for a in applied.iter().filter(|a| a.before != a.after) {
        match write(a.name, &a.before) {
            Ok(()) => info!(sysctl = a.name, value = %a.before, "restored kernel setting"),
            Err(e) => tracing::warn!(error = %e, "could not restore kernel setting"),
        }
    }
}
