//! A columnar appender: rows are written straight into a DuckDB data chunk's vectors and the
//! full chunk is handed to `duckdb_append_data_chunk`. This is the writer's hot path; the
//! per-value `append_row` of duckdb-rs cost about 5 µs a row (29 FFI calls, each with a type
//! dispatch and a cast) and capped ingest below 200k events/s.

use std::ffi::{CStr, CString};
use std::ptr;

use duckdb::ffi;

use super::database::RawConnection;
use super::schema::StoreError;

/// A column type the appender can write, with its DuckDB type id.
pub trait Cell: Copy {
    /// DuckDB's type id of the column this value goes into.
    const TYPE: ffi::DUCKDB_TYPE;
    /// Writes the value at `row` of a vector whose data starts at `data`.
    ///
    /// # Safety
    /// `data` must be the data of a vector of type `TYPE` with more than `row` slots.
    unsafe fn write(self, data: *mut u8, row: usize);
}

macro_rules! plain_cell {
    ($t:ty, $id:ident) => {
        impl Cell for $t {
            const TYPE: ffi::DUCKDB_TYPE = ffi::$id;
            unsafe fn write(self, data: *mut u8, row: usize) {
                // SAFETY: the caller guarantees the vector type and size.
                unsafe { data.cast::<$t>().add(row).write_unaligned(self) }
            }
        }
    };
}

plain_cell!(u8, DUCKDB_TYPE_DUCKDB_TYPE_UTINYINT);
plain_cell!(u16, DUCKDB_TYPE_DUCKDB_TYPE_USMALLINT);
plain_cell!(u32, DUCKDB_TYPE_DUCKDB_TYPE_UINTEGER);
plain_cell!(u64, DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT);
plain_cell!(bool, DUCKDB_TYPE_DUCKDB_TYPE_BOOLEAN);
plain_cell!(i64, DUCKDB_TYPE_DUCKDB_TYPE_BIGINT);
plain_cell!(i32, DUCKDB_TYPE_DUCKDB_TYPE_INTEGER);

/// A TIMESTAMP value: microseconds since the epoch.
#[derive(Clone, Copy, Debug)]
pub struct Micros(pub i64);

impl Cell for Micros {
    const TYPE: ffi::DUCKDB_TYPE = ffi::DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP;
    unsafe fn write(self, data: *mut u8, row: usize) {
        // SAFETY: the caller guarantees the vector type and size.
        unsafe { data.cast::<i64>().add(row).write_unaligned(self.0) }
    }
}

impl Cell for u128 {
    const TYPE: ffi::DUCKDB_TYPE = ffi::DUCKDB_TYPE_DUCKDB_TYPE_UHUGEINT;
    unsafe fn write(self, data: *mut u8, row: usize) {
        // DuckDB's uhugeint_t is {lower, upper}, two u64 with 8-byte alignment; Rust's u128
        // has 16-byte alignment, so write the halves.
        let slot = unsafe { data.cast::<u64>().add(row * 2) };
        unsafe {
            slot.write_unaligned(self as u64);
            slot.add(1).write_unaligned((self >> 64) as u64);
        }
    }
}

struct Column {
    ty: ffi::DUCKDB_TYPE,
    vector: ffi::duckdb_vector,
    data: *mut u8,
    /// Null only until the first NULL is written into the current chunk.
    validity: *mut u64,
}

/// An appender on its own connection that fills one data chunk at a time.
pub struct ChunkAppender {
    app: ffi::duckdb_appender,
    chunk: ffi::duckdb_data_chunk,
    columns: Vec<Column>,
    table: String,
    len: usize,
    capacity: usize,
    /// Rows handed to the appender since its last flush.
    unflushed: usize,
    /// A transaction is open on `conn`: rows were spilled into it before the commit.
    in_txn: bool,
    /// Dropped after `Drop::drop` has destroyed the appender on it.
    conn: RawConnection,
}

/// Rows an appender holds before it moves them into a transaction of its own, left open
/// until `flush`: DuckDB's row group. A transaction that gathers a whole row group of a
/// table has it compressed and written by DuckDB's optimistic writer as it fills, and its
/// commit logs a pointer to it; below that, each row is copied into the table, into the WAL,
/// and compressed again by the checkpoint the WAL's growth triggers. Measured with
/// `cargo xtask bench ingest`: 1.6-1.9 times the events a second with 491,520-row commits.
const SPILL_ROWS: usize = 122_880;

// SAFETY: the handles are used from one thread at a time (the writer owns this value).
unsafe impl Send for ChunkAppender {}

fn appender_error(app: ffi::duckdb_appender, context: String) -> StoreError {
    // SAFETY: `app` is a live appender; the message is owned by it.
    let msg = unsafe { ffi::duckdb_appender_error(app) };
    let detail = if msg.is_null() {
        "unknown error".to_string()
    } else {
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    };
    StoreError::Native { context, detail }
}

impl ChunkAppender {
    /// Creates an appender into `table` on `conn`, a connection of its own.
    pub(crate) fn create(conn: RawConnection, table: &str) -> Result<Self, StoreError> {
        let c_table = CString::new(table).map_err(|_| StoreError::Native {
            context: format!("creating an appender into {table}"),
            detail: "table name contains NUL".into(),
        })?;
        let mut app: ffi::duckdb_appender = ptr::null_mut();
        // SAFETY: live connection, valid C string, out-pointer to a local.
        let rc = unsafe {
            ffi::duckdb_appender_create(conn.handle(), ptr::null(), c_table.as_ptr(), &mut app)
        };
        if rc != ffi::DuckDBSuccess {
            let e = appender_error(app, format!("creating an appender into {table}"));
            unsafe { ffi::duckdb_appender_destroy(&mut app) };
            return Err(e);
        }
        // SAFETY: live appender; each logical type is destroyed after the chunk is made.
        let n = unsafe { ffi::duckdb_appender_column_count(app) } as usize;
        let mut types: Vec<ffi::duckdb_logical_type> = (0..n)
            .map(|i| unsafe { ffi::duckdb_appender_column_type(app, i as u64) })
            .collect();
        let ids: Vec<ffi::DUCKDB_TYPE> = types
            .iter()
            .map(|t| unsafe { ffi::duckdb_get_type_id(*t) })
            .collect();
        let chunk = unsafe { ffi::duckdb_create_data_chunk(types.as_mut_ptr(), n as u64) };
        for t in &mut types {
            unsafe { ffi::duckdb_destroy_logical_type(t) };
        }
        let mut me = ChunkAppender {
            conn,
            app,
            chunk,
            columns: ids
                .into_iter()
                .map(|ty| Column {
                    ty,
                    vector: ptr::null_mut(),
                    data: ptr::null_mut(),
                    validity: ptr::null_mut(),
                })
                .collect(),
            table: table.to_string(),
            len: 0,
            unflushed: 0,
            in_txn: false,
            // SAFETY: a constant of the library.
            capacity: unsafe { ffi::duckdb_vector_size() } as usize,
        };
        me.refresh_pointers();
        Ok(me)
    }

    /// Fails unless the table's columns have exactly these types, in order: checked once so
    /// that `set` can trust the layout.
    pub fn expect_types(&self, expected: &[ffi::DUCKDB_TYPE]) -> Result<(), StoreError> {
        let have: Vec<_> = self.columns.iter().map(|c| c.ty).collect();
        if have != expected {
            return Err(StoreError::Native {
                context: format!("checking the columns of {}", self.table),
                detail: format!("type ids {have:?}, this build writes {expected:?}"),
            });
        }
        Ok(())
    }

    fn refresh_pointers(&mut self) {
        for (i, c) in self.columns.iter_mut().enumerate() {
            // SAFETY: the chunk has this many columns; pointers are valid until the next reset.
            unsafe {
                c.vector = ffi::duckdb_data_chunk_get_vector(self.chunk, i as u64);
                c.data = ffi::duckdb_vector_get_data(c.vector).cast();
            }
            c.validity = ptr::null_mut();
        }
    }

    /// Starts a row, handing the full chunk to DuckDB first when needed.
    #[inline]
    pub fn begin_row(&mut self) -> Result<(), StoreError> {
        if self.len == self.capacity {
            self.append_chunk()?;
        }
        Ok(())
    }

    /// Writes column `col` of the current row.
    #[inline]
    pub fn set<T: Cell>(&mut self, col: usize, v: T) {
        let c = &self.columns[col];
        assert_eq!(
            c.ty,
            T::TYPE,
            "column {col} of {} has another type",
            self.table
        );
        // SAFETY: type checked above; `len < capacity` after begin_row.
        unsafe { v.write(c.data, self.len) }
    }

    /// Writes column `col` of the current row, or NULL.
    #[inline]
    pub fn set_opt<T: Cell>(&mut self, col: usize, v: Option<T>) {
        match v {
            Some(v) => self.set(col, v),
            None => self.set_null(col),
        }
    }

    /// Writes text into VARCHAR column `col` of the current row (DuckDB copies it).
    pub fn set_str(&mut self, col: usize, v: &str) {
        let c = &self.columns[col];
        assert_eq!(
            c.ty,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_VARCHAR,
            "column {col} of {} is not VARCHAR",
            self.table
        );
        // SAFETY: a VARCHAR vector of the current chunk; `len < capacity` after begin_row;
        // DuckDB copies the bytes (they need not be NUL-terminated).
        unsafe {
            ffi::duckdb_vector_assign_string_element_len(
                c.vector,
                self.len as u64,
                v.as_ptr().cast(),
                v.len() as u64,
            )
        }
    }

    /// Writes NULL into column `col` of the current row.
    pub fn set_null(&mut self, col: usize) {
        let c = &mut self.columns[col];
        if c.validity.is_null() {
            // SAFETY: live vector of the current chunk.
            unsafe {
                ffi::duckdb_vector_ensure_validity_writable(c.vector);
                c.validity = ffi::duckdb_vector_get_validity(c.vector);
            }
        }
        // SAFETY: the mask covers `capacity` rows.
        unsafe { ffi::duckdb_validity_set_row_invalid(c.validity, self.len as u64) }
    }

    /// Ends the current row: every column must have been set.
    #[inline]
    pub fn end_row(&mut self) {
        self.len += 1;
    }

    fn append_chunk(&mut self) -> Result<(), StoreError> {
        if self.len == 0 {
            return Ok(());
        }
        // SAFETY: live chunk and appender; the chunk's types are the table's.
        unsafe {
            ffi::duckdb_data_chunk_set_size(self.chunk, self.len as u64);
            if ffi::duckdb_append_data_chunk(self.app, self.chunk) != ffi::DuckDBSuccess {
                return Err(appender_error(
                    self.app,
                    format!("appending {} rows to {}", self.len, self.table),
                ));
            }
            ffi::duckdb_data_chunk_reset(self.chunk);
        }
        self.unflushed += self.len;
        self.len = 0;
        self.refresh_pointers();
        if self.unflushed >= SPILL_ROWS {
            self.spill()?;
        }
        Ok(())
    }

    /// Moves the appender's rows into this appender's open transaction (opened first when
    /// none is): they are not committed until `flush`, and a full row group of them goes to
    /// the file compressed rather than through the WAL.
    fn spill(&mut self) -> Result<(), StoreError> {
        if !self.in_txn {
            self.exec(c"BEGIN TRANSACTION")?;
            self.in_txn = true;
        }
        self.move_rows("moving rows into")
    }

    /// Runs the appender's buffered rows into the connection's transaction; on failure rolls
    /// it back and says `what` failed.
    fn move_rows(&mut self, what: &str) -> Result<(), StoreError> {
        // SAFETY: live appender.
        if unsafe { ffi::duckdb_appender_flush(self.app) } != ffi::DuckDBSuccess {
            let e = appender_error(
                self.app,
                format!("{what} {} ({} rows)", self.table, self.unflushed),
            );
            self.abandon();
            return Err(e);
        }
        self.unflushed = 0;
        Ok(())
    }

    /// Rolls back this appender's open transaction, if any (after a failed statement in it).
    fn abandon(&mut self) {
        if std::mem::take(&mut self.in_txn) {
            let _ = self.exec(c"ROLLBACK");
        }
    }

    /// Runs BEGIN, COMMIT or ROLLBACK on this appender's connection.
    fn exec(&self, sql: &CStr) -> Result<(), StoreError> {
        self.conn.execute(sql).map_err(|detail| StoreError::Native {
            context: format!(
                "{} for the appender into {}",
                sql.to_string_lossy(),
                self.table
            ),
            detail,
        })
    }

    /// Hands the pending rows to DuckDB and commits them, with any spilled before.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.append_chunk()?;
        self.move_rows("committing rows to")?;
        if std::mem::take(&mut self.in_txn)
            && let Err(e) = self.exec(c"COMMIT")
        {
            // A commit that failed leaves the transaction aborted, not closed.
            self.in_txn = true;
            self.abandon();
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for ChunkAppender {
    fn drop(&mut self) {
        // Rows not flushed are dropped with the chunk, and rows spilled but not committed
        // with the transaction (rolled back by the disconnect): the writer always flushes
        // first, and a flush on drop could not report its error.
        unsafe {
            ffi::duckdb_destroy_data_chunk(&mut self.chunk);
            ffi::duckdb_appender_destroy(&mut self.app);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::database::Database;

    #[test]
    fn rows_nulls_and_chunk_boundaries_round_trip() {
        let dir = std::env::temp_dir().join(format!("nattrail-chunk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        let conn = db.connect().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (a UBIGINT NOT NULL, b UHUGEINT, c TIMESTAMP, d BOOLEAN, e USMALLINT)",
        )
        .unwrap();
        let mut app = db.appender("t").unwrap();
        app.expect_types(&[
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_UHUGEINT,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_BOOLEAN,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_USMALLINT,
        ])
        .unwrap();
        assert!(
            app.expect_types(&[ffi::DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT])
                .is_err()
        );
        // More rows than one chunk holds, so the refill after a reset is exercised too.
        let n = 5000u64;
        for i in 0..n {
            app.begin_row().unwrap();
            app.set(0, i);
            app.set_opt(
                1,
                (i % 3 != 0).then_some((u128::from(i) << 64) | 0xffff_0a4d_0001),
            );
            app.set_opt(2, (i % 5 != 0).then_some(Micros(i as i64 * 1_000_000)));
            app.set(3, i % 2 == 0);
            app.set(4, (i % 65536) as u16);
            app.end_row();
        }
        app.flush().unwrap();
        let (count, nulls_b, nulls_c, sum_a): (u64, u64, u64, u64) = conn
            .query_row(
                "SELECT count(*), count(*) - count(b), count(*) - count(c), sum(a)::UBIGINT FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(count, n);
        assert_eq!(nulls_b, n.div_ceil(3));
        assert_eq!(nulls_c, n.div_ceil(5));
        assert_eq!(sum_a, n * (n - 1) / 2);
        let (b, c, d): (String, i64, bool) = conn
            .query_row(
                "SELECT b::VARCHAR, epoch_us(c), d FROM t WHERE a = 4097",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(b, ((4097u128 << 64) | 0xffff_0a4d_0001).to_string());
        assert_eq!(c, 4097 * 1_000_000);
        assert!(!d);
        drop(app);
        drop(conn);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fresh database in a scratch folder named after `name`, with table
    /// `t (a UBIGINT NOT NULL, b UHUGEINT)`.
    fn scratch(name: &str) -> (std::path::PathBuf, Database, duckdb::Connection) {
        let dir = std::env::temp_dir().join(format!("nattrail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        let conn = db.connect().unwrap();
        conn.execute_batch("CREATE TABLE t (a UBIGINT NOT NULL, b UHUGEINT)")
            .unwrap();
        (dir, db, conn)
    }

    /// Counts and sums `t.a` as another connection sees them.
    fn seen(conn: &duckdb::Connection) -> (u64, u64) {
        conn.query_row(
            "SELECT count(*)::UBIGINT, coalesce(sum(a), 0)::UBIGINT FROM t",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    #[test]
    fn spilled_rows_stay_uncommitted_until_the_flush_and_are_dropped_without_it() {
        let (dir, db, conn) = scratch("spill");
        let fill = |app: &mut ChunkAppender, from: u64, n: u64| {
            for i in from..from + n {
                app.begin_row().unwrap();
                app.set(0, i);
                app.set_opt(1, (i % 7 != 0).then_some(u128::from(i) << 70));
                app.end_row();
            }
        };
        // Two and a half row groups: two spills, then the rest at the flush.
        let n = (SPILL_ROWS * 5 / 2) as u64;
        let mut app = db.appender("t").unwrap();
        fill(&mut app, 0, n);
        assert!(app.in_txn, "{n} rows spilled into a transaction");
        assert_eq!(seen(&conn), (0, 0), "spilled rows are not committed");
        app.flush().unwrap();
        assert!(!app.in_txn);
        assert_eq!(seen(&conn), (n, n * (n - 1) / 2));
        let (nulls, max_b): (u64, String) = conn
            .query_row(
                "SELECT (count(*) - count(b))::UBIGINT, max(b)::VARCHAR FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(nulls, n.div_ceil(7));
        assert_eq!(max_b, ((u128::from(n - 1)) << 70).to_string());
        // Spilled but never flushed (a writer killed mid-batch): the rows go with the
        // transaction, and what was committed before stays.
        fill(&mut app, n, SPILL_ROWS as u64 + 10);
        assert!(app.in_txn);
        drop(app);
        assert_eq!(seen(&conn), (n, n * (n - 1) / 2));
        drop(conn);
        drop(db);
        let db = Database::open_rw(&dir.join("t.duckdb")).unwrap();
        assert_eq!(seen(&db.connect().unwrap()), (n, n * (n - 1) / 2));
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The child of `spilled_rows_are_lost_and_committed_ones_kept_when_the_process_is_killed`:
    /// commits `n` rows, spills a row group more, says so on stdout and waits to be killed.
    fn spill_and_wait(db_path: &std::path::Path, n: u64) -> ! {
        use std::io::Write;
        let db = Database::open_rw(db_path).unwrap();
        db.connect()
            .unwrap()
            .execute_batch("CREATE TABLE t (a UBIGINT NOT NULL, b UHUGEINT)")
            .unwrap();
        let mut app = db.appender("t").unwrap();
        for i in 0..n + SPILL_ROWS as u64 + 10 {
            if i == n {
                app.flush().unwrap();
            }
            app.begin_row().unwrap();
            app.set(0, i);
            app.set_null(1);
            app.end_row();
        }
        assert!(app.in_txn);
        println!("spilled");
        std::io::stdout().flush().unwrap();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    #[test]
    fn spilled_rows_are_lost_and_committed_ones_kept_when_the_process_is_killed() {
        use std::io::BufRead;
        const CHILD: &str = "NATTRAIL_TEST_SPILL_CHILD";
        // Two row groups committed (written by DuckDB's optimistic writer), then one spilled.
        let n = 2 * SPILL_ROWS as u64 + 7;
        if let Some(path) = std::env::var_os(CHILD) {
            spill_and_wait(std::path::Path::new(&path), n);
        }
        let dir = std::env::temp_dir().join(format!("nattrail-spillkill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.duckdb");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::chunk_appender::tests::spilled_rows_are_lost_and_committed_ones_kept_when_the_process_is_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let said = out
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("spilled"));
        assert!(said, "the child spilled before it was killed");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        let db = Database::open_rw(&path).unwrap();
        assert_eq!(seen(&db.connect().unwrap()), (n, n * (n - 1) / 2));
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_spill_is_rolled_back_and_the_appender_commits_again() {
        let (dir, db, conn) = scratch("spillfail");
        let mut app = db.appender("t").unwrap();
        // A NULL in the NOT NULL column, found when the rows are moved into the table.
        let mut failed = None;
        for i in 0..SPILL_ROWS as u64 {
            if let Err(e) = app.begin_row() {
                failed = Some(e);
                break;
            }
            if i == 5 {
                app.set_null(0);
            } else {
                app.set(0, i);
            }
            app.set_null(1);
            app.end_row();
        }
        let e = match failed {
            Some(e) => e,
            None => app.flush().unwrap_err(),
        };
        assert!(e.to_string().contains("NOT NULL"), "{e}");
        assert!(!app.in_txn, "the failed transaction was rolled back");
        assert_eq!(seen(&conn), (0, 0));
        // The connection is free again: rows appended from here commit.
        let mut app = db.appender("t").unwrap();
        for i in 0..3u64 {
            app.begin_row().unwrap();
            app.set(0, i);
            app.set_null(1);
            app.end_row();
        }
        app.flush().unwrap();
        assert_eq!(seen(&conn), (3, 3));
        drop(app);
        drop(conn);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
