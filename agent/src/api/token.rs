//! The bearer token: created at first start with mode 0600, read by the CLI.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use rand::RngCore;

/// Environment variable that overrides the token file for the CLI.
pub const TOKEN_ENV: &str = "NATTRAIL_TOKEN";

/// Reads the token at `path`, creating a random one (readable by root only) if absent.
pub fn load_or_create(path: &Path) -> std::io::Result<String> {
    if let Some(t) = read(path)? {
        return Ok(t);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(token.as_bytes())?;
            f.write_all(b"\n")?;
            Ok(token)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(path)?.ok_or_else(|| std::io::Error::other("token file is empty"))
        }
        Err(e) => Err(e),
    }
}

/// Reads the token at `path`; None when the file does not exist.
pub fn read(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("nattrail-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("api.token");
        let t = load_or_create(&p).unwrap();
        assert!(t.len() >= 40);
        assert_eq!(load_or_create(&p).unwrap(), t);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
