//! `nattrail sql`.

use anyhow::Result;
use clap::Args;

use super::output::{Format, pick, print_csv, print_json, print_table};
use crate::config::Config;
use crate::query::sql::run_sql;

/// Arguments of `sql`.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query (read-only: the file is opened read-only).
    query: String,
    /// At most this many rows.
    #[arg(long, default_value_t = 10_000)]
    max_rows: usize,
    /// Output format.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Shorthand for --format json.
    #[arg(long)]
    json: bool,
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs `sql`.
pub fn run(cfg: &Config, a: &SqlArgs) -> Result<()> {
    let conn = super::open_for_query(cfg)?;
    let res = run_sql(&conn, &a.query, a.max_rows)?;
    let header: Vec<&str> = res.columns.iter().map(String::as_str).collect();
    let rows: Vec<Vec<String>> = res
        .rows
        .iter()
        .map(|r| r.iter().map(cell).collect())
        .collect();
    match pick(a.format, a.json) {
        Format::Json => print_json(&res)?,
        Format::Csv => print_csv(&header, &rows)?,
        Format::Table => {
            print_table(&header, &rows);
            println!(
                "{} row(s){}",
                rows.len(),
                if res.truncated { " (truncated)" } else { "" }
            );
        }
    }
    Ok(())
}
