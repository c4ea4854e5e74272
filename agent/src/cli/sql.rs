//! `nattrail sql`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::output::{Format, outln, pick, print_csv, print_json, print_table};
use crate::config::Config;
use crate::query::request::SqlRequest;
use crate::query::sql::{SqlLimits, SqlResult, run_sql};
use crate::store::database::OpenOptions;

/// Arguments of `sql`.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query: exactly one read-only statement (SELECT, WITH, FROM, PIVOT, DESCRIBE...).
    query: String,
    /// At most this many rows; a larger answer is an error (default: api.sql_row_limit).
    #[arg(long)]
    limit: Option<usize>,
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
    let limit = a.limit.unwrap_or(cfg.api.sql_row_limit);
    let req = SqlRequest {
        sql: a.query.clone(),
        limit: Some(limit),
        timeout_ms: Some(cfg.api.sql_timeout_ms),
    };
    let res: SqlResult = match super::remote::agent(cfg)? {
        Some(api) => api.post_json("/api/v1/sql", &req)?,
        None => run_sql(
            super::open_for_query(cfg, OpenOptions::query(None))?,
            &req.sql,
            &SqlLimits {
                max_rows: limit,
                max_bytes: cfg.api.sql_max_result_bytes,
                timeout: Duration::from_millis(cfg.api.sql_timeout_ms),
            },
        )?,
    };
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
            print_table(&header, &rows)?;
            outln!("{} row(s)", rows.len())?;
        }
    }
    Ok(())
}
