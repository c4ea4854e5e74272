//! The agent's private files: the database's directory, the token and the secrets. The
//! trail is evidence and the token opens it, so each is private (0700 directories, 0600 files)
//! whatever umask the agent was started under, and an existing private file that another user
//! could have planted or read is refused rather than trusted.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a private file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    /// Reading, writing or checking the file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is a symbolic link (someone may point it at a file of theirs).
    #[error("{0} is a symbolic link; refusing it (remove it and let the agent create the file)")]
    Symlink(PathBuf),
    /// The file belongs to another user, who could read or replace it.
    #[error("{path} is owned by uid {owner}, not by this agent's uid {ours}; refusing it")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        ours: u32,
    },
    /// Group or others may access the file.
    #[error("{path} has mode {mode:04o}: group or others may access it; refusing it (chmod 600)")]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PrivateFileError {
    let path = path.to_path_buf();
    move |source| PrivateFileError::Io { what, path, source }
}

/// Creates `dir` and any missing parents with mode 0700; existing directories are left as
/// they are (a parent such as /tmp or /var/lib is not ours to change).
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    Ok(())
}

/// Sets mode 0600 on those of `paths` that exist (DuckDB creates its files with 0666 minus
/// the umask).
pub fn make_private_files(paths: &[&Path]) -> std::io::Result<()> {
    for p in paths {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_file() && m.mode() & 0o077 != 0 => {
                std::fs::set_permissions(p, Permissions::from_mode(0o600))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The directory that holds the agent's private files for database `db`: the database's
/// own directory when it is private (no group or other access, as the agent creates it and
/// as systemd's StateDirectory is), else `<db>.private/`, which the agent creates 0700. So
/// `--db /tmp/x.duckdb` never puts the token in /tmp. The CLI applies the same rule to
/// find the token.
pub fn private_dir(db: &Path) -> PathBuf {
    let parent = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::symlink_metadata(parent) {
        Ok(m) if m.is_dir() && m.mode() & 0o077 == 0 => parent.to_path_buf(),
        _ => {
            let mut name = db.as_os_str().to_os_string();
            name.push(".private");
            PathBuf::from(name)
        }
    }
}

/// Makes sure `dir` exists as a private directory of ours: created 0700 when absent,
/// refused when it is a link, another user's, or open to group or others.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PrivateFileError> {
    create_private_dir_all(dir).map_err(io("creating directory", dir))?;
    let m = std::fs::symlink_metadata(dir).map_err(io("checking directory", dir))?;
    check_owner_and_mode(dir, &m)
}

fn check_owner_and_mode(path: &Path, m: &std::fs::Metadata) -> Result<(), PrivateFileError> {
    if m.file_type().is_symlink() {
        return Err(PrivateFileError::Symlink(path.to_path_buf()));
    }
    let ours = nix::unistd::geteuid().as_raw();
    if m.uid() != ours {
        return Err(PrivateFileError::Owner {
            path: path.to_path_buf(),
            owner: m.uid(),
            ours,
        });
    }
    if m.mode() & 0o077 != 0 {
        return Err(PrivateFileError::Mode {
            path: path.to_path_buf(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Reads a private file of ours; None when it does not exist. A link, another user's file
/// or one that group or others may access is refused with the reason.
pub fn read_private(path: &Path) -> Result<Option<Vec<u8>>, PrivateFileError> {
    // O_NOFOLLOW: the check below is of the file we read, not of a link's target.
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(PrivateFileError::Symlink(path.to_path_buf()));
        }
        Err(e) => return Err(io("opening", path)(e)),
    };
    let m = f.metadata().map_err(io("checking", path))?;
    check_owner_and_mode(path, &m)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(io("reading", path))?;
    Ok(Some(out))
}

/// Reads a file that another local user may legitimately own (the CLI reading the agent's
/// token as root or as a member of its group): links are still refused.
pub fn read_nofollow(path: &Path) -> Result<Option<Vec<u8>>, PrivateFileError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            let mut out = Vec::new();
            f.read_to_end(&mut out).map_err(io("reading", path))?;
            Ok(Some(out))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            Err(PrivateFileError::Symlink(path.to_path_buf()))
        }
        Err(e) => Err(io("opening", path)(e)),
    }
}

/// Creates `path` with mode 0600 and `bytes`, failing if it exists (the caller decides what
/// an existing file means).
pub fn create_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // The mode given to open is masked by the umask; set it outright.
    f.set_permissions(Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// Replaces `path` atomically with `bytes` in a new 0600 file (written beside it, then
/// renamed over it), so a reader sees the old or the new content, never a mix. `durable`
/// also waits for the disk (secrets; not the status snapshot rewritten every second).
pub fn write_private_atomic(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    create_new_private(&tmp, bytes)?;
    if durable {
        File::open(&tmp)?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if durable && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is.
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nattrail-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn private_files_are_0600_and_bad_ones_are_refused_with_the_reason() {
        let d = scratch("refuse");
        ensure_private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        let f = d.join("a");
        write_private_atomic(&f, b"one", true).unwrap();
        write_private_atomic(&f, b"two", false).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_private(&f).unwrap().unwrap(), b"two");
        assert!(read_private(&d.join("absent")).unwrap().is_none());

        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&f).unwrap_err();
        assert!(
            matches!(e, PrivateFileError::Mode { mode: 0o644, .. }),
            "{e}"
        );

        let link = d.join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(matches!(
            read_private(&link),
            Err(PrivateFileError::Symlink(_))
        ));
        assert!(matches!(
            read_nofollow(&link),
            Err(PrivateFileError::Symlink(_))
        ));

        let theirs = d.join("theirs");
        write_private_atomic(&theirs, b"x", false).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = read_private(&theirs).unwrap_err();
        assert!(
            matches!(e, PrivateFileError::Owner { owner: 65534, .. }),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn private_dir_is_beside_the_database_only_when_that_directory_is_private() {
        let d = scratch("dir");
        create_private_dir_all(&d).unwrap();
        let db = d.join("t.duckdb");
        assert_eq!(private_dir(&db), d);
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&db), d.join("t.duckdb.private"));
        assert_eq!(
            private_dir(Path::new("/tmp/x.duckdb")),
            Path::new("/tmp/x.duckdb.private")
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
