//! Tables, JSON and CSV on standard output.

use std::io::Write;

use anyhow::Result;
use clap::ValueEnum;
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};

/// Standard output was closed by its reader (`nattrail flows | head`): the command stops
/// quietly, as ripgrep does, instead of reporting an error for output nobody reads.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// Names a failed write to standard output; a closed pipe becomes [`StdoutClosed`]. Only
/// writes to standard output go through here, so a broken pipe to the agent's socket is
/// still an error.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// `println!` that returns the write's error instead of panicking (see [`StdoutClosed`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(super::output::stdout_error)
    }};
}
pub(crate) use outln;

/// Output format of the listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Human-readable table.
    #[default]
    Table,
    /// JSON.
    Json,
    /// CSV with a header row.
    Csv,
}

/// Picks the format from `--format` and the `--json` shorthand.
pub fn pick(format: Option<Format>, json: bool) -> Format {
    if json {
        Format::Json
    } else {
        format.unwrap_or_default()
    }
}

/// Prints a table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for r in rows {
        t.add_row(r.iter().cloned());
    }
    outln!("{t}")?;
    Ok(())
}

/// Writes `bytes` to standard output (see [`StdoutClosed`]).
pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// Prints CSV with a header.
pub fn print_csv(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    // Encoded whole, then written: the rows are in memory already, and standard output's
    // errors then have one place to be told apart (a closed pipe from the rest).
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    w.flush()?;
    write_stdout(w.get_ref())
}

/// Prints pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    write_stdout(&bytes)
}

/// Renders an optional value, `-` when absent.
pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

/// `ip:port`, with brackets for IPv6.
pub fn endpoint(ip: &str, port: Option<u16>) -> String {
    match port {
        Some(p) if ip.contains(':') => format!("[{ip}]:{p}"),
        Some(p) => format!("{ip}:{p}"),
        None => ip.to_string(),
    }
}
