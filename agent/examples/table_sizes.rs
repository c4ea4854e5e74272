//! `table_sizes DB [TABLE ...]`: how many bytes each table of a trail takes on disk, measured
//! by copying it alone into a fresh file (DuckDB reports no per-table size). For the storage
//! design notes; reads DB only.

use std::path::PathBuf;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let db = PathBuf::from(args.next().context("usage: table_sizes DB [TABLE ...]")?);
    let mut tables: Vec<String> = args.collect();
    let conn = duckdb::Connection::open_in_memory()?;
    conn.execute_batch(&format!(
        "ATTACH '{}' AS trail (READ_ONLY); USE trail;",
        db.display()
    ))?;
    if let Ok(n) = std::env::var("THREADS") {
        conn.execute_batch(&format!("SET threads = {n}"))?;
    }
    if tables.is_empty() {
        let mut st = conn.prepare(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'trail' ORDER BY 1",
        )?;
        tables = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    }
    let scratch = std::env::temp_dir().join(format!("nattrail-sizes-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    if let Ok(query) = std::env::var("PARAMS") {
        // PARAMS="SELECT ... ? ..." with PARAM_VALUES="1,2,3" (integers): a cached prepared
        // statement run five times.
        let values: Vec<i64> = std::env::var("PARAM_VALUES")?
            .split(',')
            .map(|v| v.parse())
            .collect::<Result<_, _>>()?;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let mut st = conn.prepare_cached(&query)?;
            let n = st
                .query_map(duckdb::params_from_iter(values.iter()), |_| Ok(()))?
                .count();
            println!("{n} rows in {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        }
        return Ok(());
    }
    if let Ok(query) = std::env::var("EXPLAIN") {
        // EXPLAIN="SELECT ...": DuckDB's profile of one query on the trail, and its time.
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let n = conn.prepare(&query)?.query_map([], |_| Ok(()))?.count();
            println!("{n} rows in {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        }
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN ANALYZE {query}"))?
            .query_map([], |r| r.get(1))?
            .collect::<Result<_, _>>()?;
        println!("{}", plan.join("\n"));
        return Ok(());
    }
    if let Ok(query) = std::env::var("SIZE_OF") {
        // SIZE_OF="SELECT ... FROM flow_trail WHERE hour = 490900 ORDER BY ...": the rows of
        // one query stored alone.
        let out = scratch.join("q.duckdb");
        let _ = std::fs::remove_file(&out);
        conn.execute_batch(&format!(
            "ATTACH '{}' AS s; CREATE TABLE s.t AS {query}; DETACH s;",
            out.display()
        ))?;
        let rows: u64 =
            conn.query_row(&format!("SELECT count(*) FROM ({query})"), [], |r| r.get(0))?;
        let bytes = std::fs::metadata(&out)?.len().saturating_sub(786_432);
        println!(
            "{rows} rows {:>8.2} B/row",
            bytes as f64 / rows.max(1) as f64
        );
        return Ok(());
    }
    if let Ok(filter) = std::env::var("COLUMNS_OF") {
        // COLUMNS_OF="flow_trail WHERE hour = 490900": each column of those rows alone.
        let table = filter
            .split_whitespace()
            .next()
            .context("COLUMNS_OF")?
            .to_string();
        let mut st = conn.prepare(&format!(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = 'trail' AND table_name = '{table}' ORDER BY column_index"
        ))?;
        let cols: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let rows: u64 =
            conn.query_row(&format!("SELECT count(*) FROM {filter}"), [], |r| r.get(0))?;
        for c in cols {
            let out = scratch.join("c.duckdb");
            let _ = std::fs::remove_file(&out);
            conn.execute_batch(&format!(
                "ATTACH '{}' AS s; CREATE TABLE s.t AS SELECT \"{c}\" FROM {filter}; DETACH s;",
                out.display()
            ))?;
            let bytes = std::fs::metadata(&out)?.len().saturating_sub(786_432);
            println!("{c:16} {:>8.2} B/row", bytes as f64 / rows.max(1) as f64);
        }
        return Ok(());
    }
    for t in tables {
        let out = scratch.join(format!("{t}.duckdb"));
        let _ = std::fs::remove_file(&out);
        conn.execute_batch(&format!(
            "ATTACH '{}' AS s; CREATE TABLE s.t AS SELECT * FROM trail.\"{t}\"; DETACH s;",
            out.display()
        ))?;
        let rows: u64 =
            conn.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get(0))?;
        let empty = 786_432; // header and metadata blocks of an empty file
        let bytes = std::fs::metadata(&out)?.len().saturating_sub(empty);
        println!(
            "{t:24} {rows:>12} rows {:>10.1} MiB {:>8.2} B/row",
            bytes as f64 / 1048576.0,
            bytes as f64 / rows.max(1) as f64
        );
        std::fs::remove_file(&out)?;
    }
    Ok(())
}
