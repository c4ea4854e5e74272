//! `nattrail flows`.

use anyhow::Result;
use clap::Args;

use super::output::{Format, endpoint, opt, outln, pick, print_csv, print_json, print_table};
use crate::config::Config;
use crate::query::attribution::{SINCE_SCHEMA, attribute};
use crate::query::flows::{FlowRow, flows};
use crate::query::request::FlowsRequest;
use crate::store::database::OpenOptions;

/// Arguments of `flows`.
#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Internal client address.
    #[arg(long)]
    internal_ip: Option<String>,
    /// Public (translated) address.
    #[arg(long)]
    public_ip: Option<String>,
    /// Public port.
    #[arg(long)]
    public_port: Option<u16>,
    /// Any port: internal, public or destination.
    #[arg(long)]
    port: Option<u16>,
    /// Destination IP[:PORT].
    #[arg(long)]
    dst: Option<String>,
    /// tcp, udp or icmp.
    #[arg(long)]
    proto: Option<String>,
    /// Flows alive at or after this instant.
    #[arg(long)]
    since: Option<String>,
    /// Flows started at or before this instant.
    #[arg(long)]
    until: Option<String>,
    /// Zone of local --since/--until without offset (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// At most this many flows.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Output format.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Shorthand for --format json.
    #[arg(long)]
    json: bool,
}

/// Runs `flows`: through the running agent when there is one, else on the file.
pub fn run(cfg: &Config, a: &FlowsArgs) -> Result<()> {
    let req = FlowsRequest {
        internal_ip: a.internal_ip.clone(),
        public_ip: a.public_ip.clone(),
        public_port: a.public_port,
        port: a.port,
        dst: a.dst.clone(),
        proto: a.proto.clone(),
        since: a.since.clone(),
        until: a.until.clone(),
        tz: a.tz.clone(),
        limit: Some(a.limit),
    };
    let rows: Vec<FlowRow> = match super::remote::agent(cfg)? {
        Some(api) => api.get_json("/api/v1/flows", &req)?,
        None => {
            let q = req.to_query()?;
            let db = super::open_for_query(cfg, OpenOptions::query(None))?;
            let conn = db.connect()?;
            let mut rows = flows(&conn, &q)?;
            if db.schema_version() >= SINCE_SCHEMA {
                attribute(&conn, rows.iter_mut())?;
            }
            rows
        }
    };
    match pick(a.format, a.json) {
        Format::Json => print_json(&rows),
        Format::Csv => print_csv(&CSV_HEADER, &rows.iter().map(csv_row).collect::<Vec<_>>()),
        Format::Table => {
            print_table(
                &[
                    "start",
                    "end",
                    "proto",
                    "internal",
                    "public",
                    "destination",
                    "bytes out/in",
                    "ct id",
                ],
                &rows.iter().map(table_row).collect::<Vec<_>>(),
            )?;
            outln!("{} flow(s)", rows.len())?;
            Ok(())
        }
    }
}

const CSV_HEADER: [&str; 17] = [
    "start",
    "end",
    "end_inexact",
    "proto",
    "internal_ip",
    "internal_port",
    "public_ip",
    "public_port",
    "dst_ip",
    "dst_port",
    "bytes_out",
    "packets_out",
    "bytes_in",
    "packets_in",
    "conntrack_id",
    "zone",
    "found_by_dump",
];

fn csv_row(f: &FlowRow) -> Vec<String> {
    let o = |v: &Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    vec![
        f.start.clone().unwrap_or_default(),
        f.end.clone().unwrap_or_default(),
        f.end_inexact.to_string(),
        f.proto.clone(),
        f.internal_ip.clone(),
        f.internal_port.to_string(),
        f.public_ip.clone(),
        f.public_port.to_string(),
        f.dst_ip.clone(),
        f.dst_port.map(|p| p.to_string()).unwrap_or_default(),
        o(&f.bytes_out),
        o(&f.packets_out),
        o(&f.bytes_in),
        o(&f.packets_in),
        match f.conntrack_id {
            0 => String::new(),
            id => id.to_string(),
        },
        f.zone.to_string(),
        f.found_by_dump.to_string(),
    ]
}

fn table_row(f: &FlowRow) -> Vec<String> {
    vec![
        opt(&f.start),
        match &f.end {
            None => "open".into(),
            Some(e) if f.end_inexact => format!("~{e}"),
            Some(e) => e.clone(),
        },
        f.proto.clone(),
        endpoint(&f.internal_ip, Some(f.internal_port)),
        endpoint(&f.public_ip, Some(f.public_port)),
        endpoint(&f.dst_ip, f.dst_port),
        format!("{}/{}", opt(&f.bytes_out), opt(&f.bytes_in)),
        match f.conntrack_id {
            0 => String::new(),
            id => id.to_string(),
        },
    ]
}
