//! The read-write database handle, opened through DuckDB's C API so that the writer can also
//! own a raw appender (duckdb-rs hides the connection handle that `duckdb_append_data_chunk`
//! needs).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use duckdb::{Connection, ffi};

use super::chunk_appender::ChunkAppender;
use super::schema::{SCHEMA_VERSION, StoreError, check_version, db_err, migrate};

/// An open DuckDB database; every connection made from it stays valid after it is dropped
/// (DuckDB keeps the instance alive while a connection holds it).
pub struct Database {
    raw: ffi::duckdb_database,
    path: PathBuf,
    version: u32,
    changes: Changes,
}

/// Counts the writer's changes to what says how far the trail reaches (capture sessions,
/// gaps, sealed hours, retention), so that a reader may keep what it read of them: odd while
/// a change is being made, even once it is committed (a sequence lock). A reader that saw
/// the same even count before its snapshot and after knows that no change is in it that it
/// did not see.
#[derive(Debug, Default)]
pub struct Changes(AtomicU64);

impl Changes {
    /// The count now.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Marks a change begun; it counts as made when the guard drops (on every path out).
    pub fn begin(&self) -> ChangeGuard<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        ChangeGuard(self)
    }
}

/// A change in progress (see `Changes::begin`).
pub struct ChangeGuard<'a>(&'a Changes);

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: a duckdb_database is a thread-safe handle to a DuckDB instance: duckdb_connect may
// be called from any thread at once, and it is closed once, in Drop.
unsafe impl Send for Database {}
unsafe impl Sync for Database {}

/// DuckDB settings applied to every database the agent or the CLI opens. The agent needs
/// none of these features, and user SQL reaches every connection of an instance: with them on,
/// a plain SELECT could read any file on the gateway (`read_text('/etc/shadow')`), fetch or
/// load extensions, or change the settings back. `lock_configuration` comes last so that no
/// statement can undo the others.
const LOCKDOWN: &[(&str, &str)] = &[
    ("enable_external_access", "false"),
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("allow_community_extensions", "false"),
    ("allow_unsigned_extensions", "false"),
    ("lock_configuration", "true"),
];

/// DuckDB's memory limit in a read-only open (the CLI when no agent runs). With DuckDB's
/// default (80 % of the machine) `flows --internal-ip` over 7 days without a window grew to
/// 4.5 GiB and took 2.3-3.1 s; at 256 MiB it took 0.9-1.3 s and 371 MiB, and a query that
/// needs more spills to `<db>.tmp` (a DISTINCT over 38 M rows: 7.5 s, 334 MiB). At 64 MiB
/// on two threads the same listing failed to pin a block.
const READ_ONLY_MEMORY_MB: u64 = 256;

/// DuckDB's memory limit while migrating: a quarter of the machine's memory, between 1 and
/// 8 GiB.
fn migration_memory_mb() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(4 << 20);
    (total_kb / 1024 / 4).clamp(1024, 8192)
}

/// Fixes glibc's mmap threshold at 1 MiB, once per process. Left floating, glibc raises it
/// after each large free (up to 32 MiB), and then the multi-megabyte buffers of an hour's
/// seal come from the heap and stay resident; fixed at 128 KiB, every 256 KiB DuckDB block
/// was an mmap, a munmap and its page faults, and ingest ran 20-30 % slower (`cargo xtask
/// bench ingest`). At 1 MiB blocks come from the heap and large buffers go back when freed.
pub fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; any value is valid to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands the heap's free pages back to the system: DuckDB frees its blocks after a
/// checkpoint or an hour's seal, and glibc would keep them resident.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How to open a database.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open read-only (the CLI when no agent runs); the file must exist.
    pub read_only: bool,
    /// DuckDB's memory limit; None keeps DuckDB's default.
    pub memory_limit_mb: Option<u64>,
    /// DuckDB's worker threads; None keeps DuckDB's default (one per core).
    pub threads: Option<u32>,
    /// Leave DuckDB's linked extensions unloaded: only its built-in functions and operators,
    /// for statements written with those alone (the CLI's `who`). Loading the extensions is
    /// about half of an open (see `nattrail_skip_linked_extensions`).
    pub builtin_only: bool,
}

impl OpenOptions {
    /// A read-only open with the CLI's memory limit and `threads` worker threads (None: one
    /// per core).
    pub fn query(threads: Option<u32>) -> Self {
        OpenOptions {
            read_only: true,
            memory_limit_mb: Some(READ_ONLY_MEMORY_MB),
            threads,
            builtin_only: false,
        }
    }

    /// The CLI's `who`: a read-only open on one thread (a lookup reads a row group or two: a
    /// second thread only adds its start and the hand-offs, 60.7-70.0 ms a lookup against
    /// 67.0-71.9 ms on two), with DuckDB's built-in functions only.
    pub fn lookup() -> Self {
        OpenOptions {
            builtin_only: true,
            ..Self::query(Some(1))
        }
    }
}

unsafe extern "C" {
    /// Sets `DBConfig::options.load_extensions` to false on `config`, which no named setting
    /// reaches (`src/store/duckdb_config.cpp`, compiled against the bundled DuckDB's headers).
    fn nattrail_skip_linked_extensions(config: ffi::duckdb_config);
}

/// The owned result of `duckdb_create_config`, destroyed on drop.
struct RawConfig(ffi::duckdb_config);

impl RawConfig {
    fn new(path: &Path) -> Result<Self, StoreError> {
        let mut raw: ffi::duckdb_config = ptr::null_mut();
        // SAFETY: out-pointer to a local.
        if unsafe { ffi::duckdb_create_config(&mut raw) } != ffi::DuckDBSuccess {
            return Err(native(path, "creating a DuckDB configuration"));
        }
        Ok(RawConfig(raw))
    }

    fn set(&mut self, path: &Path, key: &str, value: &str) -> Result<(), StoreError> {
        let (k, v) = (
            CString::new(key).expect("setting names have no NUL"),
            CString::new(value).expect("setting values have no NUL"),
        );
        // SAFETY: a live config and two C strings that outlive the call.
        if unsafe { ffi::duckdb_set_config(self.0, k.as_ptr(), v.as_ptr()) } != ffi::DuckDBSuccess {
            return Err(native(
                path,
                &format!("setting DuckDB option {key} = {value}"),
            ));
        }
        Ok(())
    }
}

impl Drop for RawConfig {
    fn drop(&mut self) {
        // SAFETY: created in new, destroyed once.
        unsafe { ffi::duckdb_destroy_config(&mut self.0) };
    }
}

fn native(path: &Path, context: &str) -> StoreError {
    StoreError::Native {
        context: format!("{context} for {}", path.display()),
        detail: "DuckDB refused".into(),
    }
}

/// A connection made through DuckDB's C API, for what duckdb-rs does not expose (statement
/// extraction and classification); disconnected on drop.
pub struct RawConnection(ffi::duckdb_connection);

// SAFETY: a duckdb_connection may move between threads; DuckDB serialises its use, and
// duckdb_interrupt is meant to be called from another thread.
unsafe impl Send for RawConnection {}
unsafe impl Sync for RawConnection {}

impl RawConnection {
    /// The C handle, valid while `self` lives.
    pub fn handle(&self) -> ffi::duckdb_connection {
        self.0
    }

    /// Interrupts whatever runs on this connection (from any thread).
    pub fn interrupt(&self) {
        // SAFETY: a live connection; interrupting is thread-safe.
        unsafe { ffi::duckdb_interrupt(self.0) };
    }

    /// Runs SQL of our own that returns nothing (BEGIN, COMMIT); Err holds DuckDB's message.
    pub fn execute(&self, sql: &CStr) -> Result<(), String> {
        // SAFETY: a zeroed duckdb_result is the documented initial state for duckdb_query.
        let mut res: ffi::duckdb_result = unsafe { std::mem::zeroed() };
        // SAFETY: a live connection, a C string and an out-pointer to a local.
        let rc = unsafe { ffi::duckdb_query(self.0, sql.as_ptr(), &mut res) };
        let err = (rc != ffi::DuckDBSuccess).then(|| {
            // SAFETY: the message is owned by the result, read before it is destroyed.
            let p = unsafe { ffi::duckdb_result_error(&mut res) };
            if p.is_null() {
                "no message from DuckDB".to_string()
            } else {
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        });
        // SAFETY: destroyed once, whatever the outcome.
        unsafe { ffi::duckdb_destroy_result(&mut res) };
        err.map_or(Ok(()), Err)
    }
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        // SAFETY: connected in Database::raw_connection, disconnected once.
        unsafe { ffi::duckdb_disconnect(&mut self.0) };
    }
}

impl Database {
    /// Opens the database read-write (creating it and a private directory for it) and
    /// migrates it.
    pub fn open_rw(path: &Path) -> Result<Self, StoreError> {
        Self::open(path, OpenOptions::default())
    }

    /// Opens an existing database read-only, refusing one written by a newer nattrail.
    pub fn open_ro(path: &Path) -> Result<Self, StoreError> {
        Self::open(path, OpenOptions::query(None))
    }

    /// Opens the database with the lockdown settings; read-write opens migrate it.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self, StoreError> {
        if !opts.read_only && path.exists() {
            // Migrations may rewrite the whole trail (schema 8 joins a day of events into
            // flows): they run in an instance of their own with room for that, and the
            // agent's then opens with its own limit (nothing left to migrate).
            let roomy = OpenOptions {
                read_only: false,
                memory_limit_mb: Some(migration_memory_mb().max(opts.memory_limit_mb.unwrap_or(0))),
                threads: None,
                builtin_only: false,
            };
            drop(Self::open_once(path, roomy)?);
        }
        Self::open_once(path, opts)
    }

    fn open_once(path: &Path, opts: OpenOptions) -> Result<Self, StoreError> {
        if opts.read_only {
            if !path.exists() {
                return Err(StoreError::Missing(path.to_path_buf()));
            }
        } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::store::files::create_private_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let file = resolved(path);
        let c_path =
            CString::new(file.as_os_str().as_encoded_bytes()).map_err(|_| StoreError::Native {
                context: format!("opening database {}", path.display()),
                detail: "the path contains a NUL byte".into(),
            })?;
        let mut config = RawConfig::new(path)?;
        if opts.read_only {
            config.set(path, "access_mode", "READ_ONLY")?;
        }
        if let Some(mb) = opts.memory_limit_mb {
            config.set(path, "memory_limit", &format!("{}MiB", mb.max(64)))?;
        }
        if let Some(n) = opts.threads {
            config.set(path, "threads", &n.max(1).to_string())?;
        }
        for (k, v) in LOCKDOWN {
            config.set(path, k, v)?;
        }
        // DuckDB 2.0 starts 8 threads for asynchronous I/O at every open, used for remote
        // files, which the lockdown forbids: starting them cost a CLI lookup 1.5-5 ms here.
        config.set(path, "async_threads", "0")?;
        if opts.builtin_only {
            // Measured with a C++ program on the same library, 1-day trail, 15 opens each:
            // 9.4-10.2 ms against 21.0-23.7 ms. A first statement then compiles DuckDB's SQL
            // grammar (5-6 ms), which loading JSON did during the open. A CLI `who`, binaries
            // side by side on the bench's cases: 53.4 against 64.3 ms.
            // SAFETY: a live config, not yet used to open.
            unsafe { nattrail_skip_linked_extensions(config.0) };
        }
        let mut raw: ffi::duckdb_database = ptr::null_mut();
        let mut err: *mut std::os::raw::c_char = ptr::null_mut();
        // SAFETY: valid C string and config, out-pointers to locals.
        let rc = unsafe { ffi::duckdb_open_ext(c_path.as_ptr(), &mut raw, config.0, &mut err) };
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
        let mut db = Database {
            raw,
            path: path.to_path_buf(),
            version: SCHEMA_VERSION,
            changes: Changes::default(),
        };
        if opts.read_only {
            db.version = check_version(&db.connect()?, path)?;
        } else {
            // DuckDB creates the file and its WAL with 0666 minus the umask: the trail is
            // evidence, private whatever the umask we were started under.
            crate::store::files::make_private_files(&[&file, wal_path(&file).as_path()]).map_err(
                |source| StoreError::Dir {
                    path: path.to_path_buf(),
                    source,
                },
            )?;
            migrate(&db.connect()?, path)?;
        }
        Ok(db)
    }

    /// The schema version of the file: the latest once migrated, as found when read-only.
    pub fn schema_version(&self) -> u32 {
        self.version
    }

    /// The writer's changes to the trail's coverage (see `Changes`).
    pub fn changes(&self) -> &Changes {
        &self.changes
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

    /// The secrets file of this database's triggers.
    pub fn secrets(&self) -> super::secrets::SecretStore {
        super::secrets::SecretStore::for_db(&self.path)
    }

    /// A connection through the C API (see `RawConnection`).
    pub fn raw_connection(&self) -> Result<RawConnection, StoreError> {
        let mut con: ffi::duckdb_connection = ptr::null_mut();
        // SAFETY: `raw` is an open database until Drop; out-pointer to a local.
        if unsafe { ffi::duckdb_connect(self.raw, &mut con) } != ffi::DuckDBSuccess {
            return Err(native(&self.path, "connecting"));
        }
        Ok(RawConnection(con))
    }

    /// A raw appender into `table`, on its own connection.
    pub fn appender(&self, table: &str) -> Result<ChunkAppender, StoreError> {
        ChunkAppender::create(self.raw_connection()?, table)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // SAFETY: opened in open_rw, closed only here.
        unsafe { ffi::duckdb_close(&mut self.raw) };
    }
}

/// The file DuckDB is given: `path` with its links resolved. DuckDB resolves a linked file
/// itself, and the lockdown (no file system access beyond the database) then refuses the WAL
/// beside the target: a trail linked onto another disk could be neither run nor read.
pub fn resolved(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    // A link to a trail not created yet (the agent's first start) names the file to create.
    for _ in 0..40 {
        match std::fs::read_link(&p) {
            Ok(target) => p = p.parent().unwrap_or(Path::new("/")).join(target),
            Err(_) => break,
        }
    }
    match (
        p.parent().filter(|d| !d.as_os_str().is_empty()),
        p.file_name(),
    ) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map_or(p.clone(), |d| d.join(name)),
        _ => p,
    }
}

/// DuckDB's write-ahead log beside `db`.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(".wal");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C++ shim reaches DuckDB's field: an open with `builtin_only` has no core function
    /// and no JSON, a default one has both; both keep the built-ins and the lockdown.
    #[test]
    fn builtin_only_opens_leave_the_linked_extensions_unloaded() {
        let dir = std::env::temp_dir().join(format!("nattrail-builtin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("t.duckdb");
        drop(Database::open_rw(&path).unwrap());
        for builtin_only in [false, true] {
            let opts = OpenOptions {
                builtin_only,
                ..OpenOptions::query(Some(1))
            };
            let conn = Database::open(&path, opts).unwrap().connect().unwrap();
            let ask = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, String>(0));
            assert_eq!(ask("SELECT (7 % 2)::VARCHAR").unwrap(), "1");
            for (sql, want, extension) in [
                ("SELECT (6 & 3)::VARCHAR", "2", "core_functions"),
                (
                    "SELECT epoch_us(TIMESTAMP '1970-01-01 00:00:01')::VARCHAR",
                    "1000000",
                    "core_functions",
                ),
                (
                    "SELECT json_extract('{\"a\": 5}', '$.a')::VARCHAR",
                    "5",
                    "json",
                ),
            ] {
                match ask(sql) {
                    Ok(v) if !builtin_only => assert_eq!(v, want, "{sql}"),
                    Err(e) if builtin_only => {
                        let e = e.to_string();
                        assert!(
                            e.contains(&format!("exists in the {extension} extension")),
                            "{sql}: {e}"
                        )
                    }
                    other => panic!("builtin_only {builtin_only}, {sql}: {other:?}"),
                }
            }
            let err = ask("SELECT content FROM read_text('/etc/hostname')").unwrap_err();
            assert!(
                err.to_string().contains("disabled by configuration"),
                "builtin_only {builtin_only}: {err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
