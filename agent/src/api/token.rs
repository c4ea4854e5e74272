//! The bearer token: created at first start in the agent's private directory with mode
//! 0600, read by the CLI. An existing token file that is a link, another user's, or open to
//! group or others is refused: someone else may know that token.

use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;

use crate::config::ApiConfig;
use crate::store::files::{self, PrivateFileError};

/// Environment variable that overrides the token file for the CLI.
pub const TOKEN_ENV: &str = "NATTRAIL_TOKEN";

/// The token file: `[api] token_file`, or `api.token` in the private directory of `db`
/// (see `files::private_dir`).
pub fn path(cfg: &ApiConfig, db: &Path) -> PathBuf {
    if cfg.token_file.is_empty() {
        files::private_dir(db).join("api.token")
    } else {
        PathBuf::from(&cfg.token_file)
    }
}

fn parse(path: &Path, bytes: Vec<u8>) -> Result<Option<String>, PrivateFileError> {
    let text = String::from_utf8(bytes).map_err(|_| PrivateFileError::Io {
        what: "reading token",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
    })?;
    let t = text.trim();
    Ok((!t.is_empty()).then(|| t.to_string()))
}

/// Reads the agent's token at `path`, creating a random one if absent (its directory made
/// private first when it is the default one).
pub fn load_or_create(path: &Path) -> Result<String, PrivateFileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        files::ensure_private_dir(dir)?;
    }
    if let Some(t) = files::read_private(path)?
        .map(|b| parse(path, b))
        .transpose()?
    {
        return t.ok_or_else(|| PrivateFileError::Io {
            what: "reading token",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
        });
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    match files::create_new_private(path, format!("{token}\n").as_bytes()) {
        Ok(()) => Ok(token),
        // Another process created it first: use theirs, checked like any existing file.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => files::read_private(path)?
            .map(|b| parse(path, b))
            .transpose()?
            .flatten()
            .ok_or_else(|| PrivateFileError::Io {
                what: "reading token",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
            }),
        Err(source) => Err(PrivateFileError::Io {
            what: "creating token",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads the token at `path` for the CLI (root or a member of the agent's group may read
/// the agent's file); None when the file does not exist. Links are refused.
pub fn read(path: &Path) -> Result<Option<String>, PrivateFileError> {
    files::read_nofollow(path)?
        .map(|b| parse(path, b))
        .transpose()
        .map(Option::flatten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_mode_0600_and_refused_when_exposed() {
        let dir = std::env::temp_dir().join(format!("nattrail-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("api.token");
        let t = load_or_create(&p).unwrap();
        assert!(t.len() >= 40);
        assert_eq!(load_or_create(&p).unwrap(), t);
        assert_eq!(read(&p).unwrap().as_deref(), Some(t.as_str()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
