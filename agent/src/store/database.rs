//! The read-write database handle, opened through DuckDB's C API so that the writer can also
//! own a raw appender (duckdb-rs hides the connection handle that `duckdb_append_data_chunk`
//! needs).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;

use duckdb::{Connection, ffi};

use super::chunk_appender::ChunkAppender;
use super::schema::{StoreError, db_err, migrate};

/// An open DuckDB database; every connection made from it stays valid after it is dropped
/// (DuckDB keeps the instance alive while a connection holds it).
pub struct Database {
    raw: ffi::duckdb_database,
    path: PathBuf,
}

// SAFETY: a duckdb_database is a thread-safe handle to a DuckDB instance: duckdb_connect may
// be called from any thread at once, and it is closed once, in Drop.
unsafe impl Send for Database {}
unsafe impl Sync for Database {}

impl Database {
    /// Opens the database read-write (creating it and its directory) and migrates it.
    pub fn open_rw(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| StoreError::Native {
                context: format!("opening database {}", path.display()),
                detail: "the path contains a NUL byte".into(),
            })?;
        let mut raw: ffi::duckdb_database = ptr::null_mut();
        let mut err: *mut std::os::raw::c_char = ptr::null_mut();
        // SAFETY: valid C string, out-pointers to locals; a null config means defaults.
        let rc =
            unsafe { ffi::duckdb_open_ext(c_path.as_ptr(), &mut raw, ptr::null_mut(), &mut err) };
        if rc != ffi::DuckDBSuccess {
            let detail = if err.is_null() {
                "unknown error".to_string()
            } else {
                // SAFETY: DuckDB returns a NUL-terminated message we must free.
                let s = unsafe { CStr::from_ptr(err) }
                    .to_string_lossy()
                    .into_owned();
                unsafe { ffi::duckdb_free(err.cast()) };
                s
            };
            return Err(StoreError::from_open_message(path, detail));
        }
        let db = Database {
            raw,
            path: path.to_path_buf(),
        };
        migrate(&db.connect()?, path)?;
        Ok(db)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new duckdb-rs connection to this database.
    pub fn connect(&self) -> Result<Connection, StoreError> {
        // SAFETY: `raw` is an open database until Drop.
        unsafe { Connection::open_from_raw(self.raw) }
            .map_err(db_err(format!("connecting to {}", self.path.display())))
    }

    /// A raw appender into `table`, on its own connection.
    pub fn appender(&self, table: &str) -> Result<ChunkAppender, StoreError> {
        ChunkAppender::create(self.raw, table)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // SAFETY: opened in open_rw, closed only here.
        unsafe { ffi::duckdb_close(&mut self.raw) };
    }
}
