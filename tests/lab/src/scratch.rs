//! Scratch directories for a test's database, config and logs, removed on drop.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// A directory under the system temp dir, unique to this process and name.
pub struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    /// Creates `/tmp/nattrail-<name>-<pid>` afresh. Set NATTRAIL_KEEP_SCRATCH=1 to keep it.
    pub fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Scratch {
            path,
            keep: std::env::var_os("NATTRAIL_KEEP_SCRATCH").is_some(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
