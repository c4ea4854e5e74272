//! `nattrail events`: the starts and ends of flows in time order, a page at a time.

use anyhow::Result;
use clap::Args;

use super::output::{Format, outln, pick, print_csv, print_json, print_table};
use crate::config::Config;
use crate::query::events::{EventRow, EventsPage, events};
use crate::query::request::EventsRequest;
use crate::store::database::OpenOptions;

/// Arguments of `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Events at or after this instant.
    #[arg(long)]
    since: Option<String>,
    /// Events at or before this instant.
    #[arg(long)]
    until: Option<String>,
    /// Zone of local instants (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// Any address of the flow: internal, public or destination.
    #[arg(long)]
    ip: Option<String>,
    /// Any port of the flow.
    #[arg(long)]
    port: Option<u16>,
    /// new, destroy or dump.
    #[arg(long)]
    kind: Option<String>,
    /// Events per page.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Continue after this cursor (printed at the end of the previous page).
    #[arg(long)]
    cursor: Option<u64>,
    /// Output format.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Shorthand for --format json.
    #[arg(long)]
    json: bool,
}

fn row(e: &EventRow) -> Vec<String> {
    let o = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    vec![
        e.seq.to_string(),
        e.ts.clone(),
        e.kind.clone(),
        e.proto.clone(),
        format!("{}:{}", e.internal_ip, e.internal_port),
        format!("{}:{}", e.public_ip, e.public_port),
        format!("{}:{}", e.dst_ip, e.dst_port),
        o(e.bytes_out),
        o(e.bytes_in),
        e.conntrack_id.map(|i| i.to_string()).unwrap_or_default(),
    ]
}

const HEADER: [&str; 10] = [
    "seq",
    "ts",
    "kind",
    "proto",
    "internal",
    "public",
    "destination",
    "bytes out",
    "bytes in",
    "ct id",
];

/// Runs `events`: through the running agent when there is one, else on the file.
pub fn run(cfg: &Config, a: &EventsArgs) -> Result<()> {
    let req = EventsRequest {
        since: a.since.clone(),
        until: a.until.clone(),
        tz: a.tz.clone(),
        ip: a.ip.clone(),
        port: a.port,
        kind: a.kind.clone(),
        limit: Some(a.limit),
        cursor: a.cursor,
    };
    let page: EventsPage = match super::remote::agent(cfg)? {
        Some(api) => api.get_json("/api/v1/events", &req)?,
        None => events(
            &super::open_for_query(cfg, OpenOptions::query(None))?.connect()?,
            &req.to_query()?,
        )?,
    };
    let rows: Vec<Vec<String>> = page.events.iter().map(row).collect();
    match pick(a.format, a.json) {
        Format::Json => print_json(&page),
        Format::Csv => print_csv(&HEADER, &rows),
        Format::Table => {
            print_table(&HEADER, &rows)?;
            match page.next_cursor {
                Some(c) => outln!("{} event(s); more with --cursor {c}", rows.len())?,
                None => outln!("{} event(s)", rows.len())?,
            }
            Ok(())
        }
    }
}
