//! `nattrail who`.

use anyhow::Result;
use clap::Args;

use super::output::{endpoint, opt, outln, print_json, print_table};
use crate::config::Config;
use crate::query::attribution::{Attribution, OwnerStatus, SINCE_SCHEMA, attribute};
use crate::query::request::WhoRequest;
use crate::query::who::{WhoAnswer, WhoStatus, who};
use crate::store::database::OpenOptions;

/// Arguments of `who`.
#[derive(Debug, Args)]
pub struct WhoArgs {
    /// Public (translated) IP address from the report.
    #[arg(long)]
    ip: String,
    /// Public port from the report (ICMP id for ICMP).
    #[arg(long)]
    port: u16,
    /// Instant from the report: RFC 3339 with offset, epoch seconds, or 'YYYY-MM-DD HH:MM:SS' (see --tz).
    #[arg(long)]
    at: String,
    /// How far the report's clock may be off.
    #[arg(long, default_value = "10s")]
    tolerance: String,
    /// Zone of a local --at without offset: IANA name or offset like +01:00 (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// tcp, udp or icmp.
    #[arg(long)]
    proto: Option<String>,
    /// Destination IP[:PORT] the client talked to.
    #[arg(long)]
    dst: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl WhoArgs {
    fn request(&self) -> WhoRequest {
        WhoRequest {
            ip: self.ip.clone(),
            port: self.port,
            at: self.at.clone(),
            tolerance: Some(self.tolerance.clone()),
            tz: self.tz.clone(),
            proto: self.proto.clone(),
            dst: self.dst.clone(),
        }
    }
}

/// Runs `who`: through the running agent when there is one, else on the file.
pub fn run(cfg: &Config, a: &WhoArgs) -> Result<()> {
    let req = a.request();
    let ans: WhoAnswer = match super::remote::agent(cfg)? {
        Some(api) => api.get_json("/api/v1/who", &req)?,
        None => {
            // The CLI reads the database itself only when no agent holds it.
            let q = req.to_query(false)?;
            let db = super::open_for_query(cfg, OpenOptions::lookup())?;
            let conn = db.connect()?;
            let mut ans = who(&conn, &q)?;
            // A trail older than the socket rows is read as it is (the CLI does not migrate).
            if db.schema_version() >= SINCE_SCHEMA {
                attribute(&conn, ans.matches.iter_mut().map(|m| &mut m.flow))?;
            }
            ans
        }
    };
    if a.json {
        print_json(&ans)
    } else {
        print_human(&endpoint(&req.ip, Some(req.port)), &ans)
    }
}

fn print_human(public: &str, ans: &WhoAnswer) -> Result<()> {
    match ans.status {
        WhoStatus::None => {
            outln!(
                "NONE: no flow used {public} within ±{}s of {}",
                ans.tolerance_s,
                ans.at
            )?;
            return print_holes(ans);
        }
        WhoStatus::Found => {
            let m = &ans.matches[0];
            outln!(
                "FOUND: {public} was {} ({}) at {}",
                endpoint(&m.flow.internal_ip, Some(m.flow.internal_port)),
                m.flow.proto,
                ans.at
            )?;
        }
        WhoStatus::Incomplete => outln!(
            "INCOMPLETE: the trail has a hole at {}; {} flow(s) found within ±{}s of {public}, \
             but another may be missing",
            ans.at,
            ans.matches.len(),
            ans.tolerance_s
        )?,
        WhoStatus::Ambiguous => outln!(
            "AMBIGUOUS: {} flows used {public} within ±{}s of {}; best match first",
            ans.matches.len(),
            ans.tolerance_s,
            ans.at
        )?,
    }
    let rows: Vec<Vec<String>> = ans
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let f = &m.flow;
            let end = match (&f.end, f.end_inexact) {
                (None, _) => "still open".to_string(),
                (Some(e), true) => format!("{e} (inexact, after {})", opt(&f.end_not_before)),
                (Some(e), false) => e.clone(),
            };
            vec![
                (i + 1).to_string(),
                endpoint(&f.internal_ip, Some(f.internal_port)),
                f.proto.clone(),
                endpoint(&f.dst_ip, f.dst_port),
                opt(&f.start),
                end,
                if m.covers {
                    "yes".into()
                } else {
                    format!("{:.3}s off", m.distance_s)
                },
                format!("{}/{}", opt(&f.bytes_out), opt(&f.bytes_in)),
                format!("{}/{}", opt(&f.packets_out), opt(&f.packets_in)),
                match f.conntrack_id {
                    0 => String::new(),
                    id => id.to_string(),
                },
                owner(f.attribution.as_ref()),
            ]
        })
        .collect();
    if ans.matches.is_empty() {
        return print_holes(ans);
    }
    print_table(
        &[
            "#",
            "internal",
            "proto",
            "destination",
            "start",
            "end",
            "covers T",
            "bytes out/in",
            "pkts out/in",
            "ct id",
            "owner",
        ],
        &rows,
    )?;
    print_holes(ans)
}

/// The owner column: process and container, or why there is none.
fn owner(a: Option<&Attribution>) -> String {
    let Some(a) = a else {
        return String::new();
    };
    match a.status {
        OwnerStatus::None => "none (not from this host)".into(),
        OwnerStatus::Unknown => "attribution unknown".into(),
        OwnerStatus::Local => {
            let mut s = format!(
                "pid {} {}",
                a.pid.map(|p| p.to_string()).unwrap_or_default(),
                a.exe.as_deref().or(a.comm.as_deref()).unwrap_or("")
            );
            if let Some(c) = &a.container {
                s.push_str(&format!(
                    " in {c} ({})",
                    a.workload.as_deref().unwrap_or(c.as_str())
                ));
            }
            s
        }
    }
}

fn print_holes(ans: &WhoAnswer) -> Result<()> {
    for h in &ans.holes {
        let lost = h
            .lost
            .map(|n| format!(", {n} events lost"))
            .unwrap_or_default();
        outln!(
            "hole: {} .. {}: {}{lost}",
            h.start.as_deref().unwrap_or("(beginning)"),
            h.end.as_deref().unwrap_or("(now)"),
            h.reason
        )?;
    }
    Ok(())
}
