//! A columnar appender: rows are written straight into a DuckDB data chunk's vectors and the
//! full chunk is handed to `duckdb_append_data_chunk`. This is the writer's hot path; the
//! per-value `append_row` of duckdb-rs cost about 5 µs a row (29 FFI calls, each with a type
//! dispatch and a cast) and capped ingest below 200k events/s.

use std::ffi::{CStr, CString};
use std::ptr;

use duckdb::ffi;

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
    conn: ffi::duckdb_connection,
    app: ffi::duckdb_appender,
    chunk: ffi::duckdb_data_chunk,
    columns: Vec<Column>,
    table: String,
    len: usize,
    capacity: usize,
}

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
    /// Creates an appender into `table` of the open database `db`.
    pub(crate) fn create(db: ffi::duckdb_database, table: &str) -> Result<Self, StoreError> {
        let native = |detail: &str| StoreError::Native {
            context: format!("creating an appender into {table}"),
            detail: detail.to_string(),
        };
        let c_table = CString::new(table).map_err(|_| native("table name contains NUL"))?;
        let mut conn: ffi::duckdb_connection = ptr::null_mut();
        // SAFETY: `db` is open (the caller holds the Database).
        if unsafe { ffi::duckdb_connect(db, &mut conn) } != ffi::DuckDBSuccess {
            return Err(native("could not connect"));
        }
        let mut app: ffi::duckdb_appender = ptr::null_mut();
        // SAFETY: live connection, valid C string, out-pointer to a local.
        let rc =
            unsafe { ffi::duckdb_appender_create(conn, ptr::null(), c_table.as_ptr(), &mut app) };
        if rc != ffi::DuckDBSuccess {
            let e = appender_error(app, format!("creating an appender into {table}"));
            unsafe {
                ffi::duckdb_appender_destroy(&mut app);
                ffi::duckdb_disconnect(&mut conn);
            }
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
        self.len = 0;
        self.refresh_pointers();
        Ok(())
    }

    /// Hands the pending rows to DuckDB and commits them.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.append_chunk()?;
        // SAFETY: live appender.
        if unsafe { ffi::duckdb_appender_flush(self.app) } != ffi::DuckDBSuccess {
            return Err(appender_error(
                self.app,
                format!("committing rows to {}", self.table),
            ));
        }
        Ok(())
    }
}

impl Drop for ChunkAppender {
    fn drop(&mut self) {
        // Rows not flushed are dropped with the chunk: the writer always flushes first, and a
        // flush on drop could not report its error.
        unsafe {
            ffi::duckdb_destroy_data_chunk(&mut self.chunk);
            ffi::duckdb_appender_destroy(&mut self.app);
            ffi::duckdb_disconnect(&mut self.conn);
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
}
