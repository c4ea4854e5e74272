//! `nattrail status`: the agent's stage counters, the gaps of the last 24 h, database size.

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Args;

use super::output::{outln, print_json, print_table};
use crate::config::Config;
use crate::status::{self, AgentState, AgentStatus, DatabaseInfo, StatusReport};
use crate::store::gaps;
use crate::store::schema::{StoreError, open_ro};

/// A snapshot older than this while claiming "running" means the agent died.
const STALE_AFTER_S: i64 = 10;

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn state_of(s: Option<&AgentStatus>) -> AgentState {
    let Some(s) = s else {
        return AgentState::Unknown;
    };
    if !s.running {
        return AgentState::Stopped;
    }
    let fresh = DateTime::parse_from_rfc3339(&s.updated)
        .is_ok_and(|t| (Utc::now() - t.with_timezone(&Utc)).num_seconds() < STALE_AFTER_S);
    let alive = std::path::Path::new(&format!("/proc/{}", s.pid)).exists();
    if fresh && alive {
        AgentState::Running
    } else {
        AgentState::Died
    }
}

/// Builds the report from the files when no agent answers: its last snapshot, and the
/// database when it can be opened.
fn local_report(cfg: &Config) -> Result<StatusReport> {
    let snapshot = status::read(&cfg.db_path);
    let day_ago = Utc::now().timestamp_micros() - status::DAY_US;
    let (gaps_from, gaps_24h) = match open_ro(&cfg.db_path) {
        Ok(conn) => ("database", gaps::since(&conn, day_ago)?),
        Err(StoreError::Locked { .. }) | Err(StoreError::Missing(_)) => (
            "agent snapshot",
            snapshot
                .as_ref()
                .map(|s| s.gaps_24h.clone())
                .unwrap_or_default(),
        ),
        Err(e) => return Err(e.into()),
    };
    Ok(StatusReport {
        agent_state: state_of(snapshot.as_ref()),
        agent: snapshot,
        database: DatabaseInfo::of(&cfg.db_path),
        gaps_from: gaps_from.to_string(),
        gaps_24h,
    })
}

/// Runs `status`.
pub fn run(cfg: &Config, a: &StatusArgs) -> Result<()> {
    let report = match super::remote::agent(cfg)? {
        Some(api) => api.get_json("/api/v1/stats", &())?,
        None => local_report(cfg)?,
    };
    if a.json {
        return print_json(&report);
    }
    print_human(&report)
}

fn print_human(r: &StatusReport) -> Result<()> {
    match (&r.agent, r.agent_state) {
        (Some(s), AgentState::Running) => {
            outln!("agent: running (pid {}, since {})", s.pid, s.started)?
        }
        (Some(s), AgentState::Stopped) => outln!("agent: stopped (at {})", s.updated)?,
        (Some(s), _) => outln!(
            "agent: NOT running: its last snapshot ({}) says running; it ended without a clean stop",
            s.updated
        )?,
        (None, _) => outln!("agent: no status snapshot beside this database")?,
    }
    outln!(
        "database: {} ({:.1} MiB, WAL {:.1} MiB)",
        r.database.path,
        r.database.size_bytes as f64 / 1048576.0,
        r.database.wal_bytes as f64 / 1048576.0
    )?;
    if let Some(s) = &r.agent {
        let rows: Vec<Vec<String>> = s
            .stages
            .iter()
            .map(|st| {
                vec![
                    st.name.clone(),
                    st.received.to_string(),
                    st.forwarded.to_string(),
                    st.dropped.to_string(),
                    st.throttled_ms.to_string(),
                    format!("{}/{}", st.depth, st.capacity),
                    st.peak_depth.to_string(),
                ]
            })
            .collect();
        print_table(
            &[
                "stage",
                "received",
                "forwarded",
                "dropped",
                "throttled ms",
                "depth",
                "peak",
            ],
            &rows,
        )?;
        let c = &s.conntrack;
        outln!(
            "conntrack: {} decoded, {} forwarded, {} filtered, {} decode errors, {} overflows, {} dropped by the kernel, {} resyncs",
            c.decoded,
            c.forwarded,
            c.filtered,
            c.decode_errors,
            c.overflows,
            c.kernel_dropped,
            c.resyncs
        )?;
        let w = &s.writer;
        outln!(
            "writer: {} rows in {} commits, {} open flows, {} duplicates skipped, {} closed by reconciliation",
            w.rows,
            w.commits,
            w.open_flows,
            w.duplicates,
            w.reconciled
        )?;
        if let Some(l) = &s.logscan {
            outln!(
                "log scan: {} tails, {} lines, {} hits, {} held back by cooldown, {} by the bucket, {} lines cut, {} stream errors",
                l.discovery.active_tails,
                l.scan.lines_seen,
                l.scan.hits,
                l.scan.suppressed_cooldown,
                l.scan.suppressed_bucket,
                l.tails.truncated,
                l.tails.stream_errors
            )?;
            for e in &l.compile_errors {
                outln!("rule {} does not compile: {}", e.rule_id, e.error)?;
            }
        }
        if let Some(w) = &s.webhooks {
            outln!(
                "webhooks: {} events, {} matched, {} delivered, {} failed, {} rate-limited, {} dropped (queue full), {} missed (behind the bus), {} abandoned at stop",
                w.events,
                w.matched,
                w.delivered,
                w.failed,
                w.rate_limited,
                w.dropped,
                w.missed,
                w.abandoned
            )?;
        }
    }
    if r.gaps_24h.is_empty() {
        outln!("gaps in the last 24 h: none")?;
    } else {
        outln!(
            "gaps in the last 24 h ({}, from the {}):",
            r.gaps_24h.len(),
            r.gaps_from
        )?;
        let rows: Vec<Vec<String>> = r
            .gaps_24h
            .iter()
            .map(|g| {
                vec![
                    g.source.clone(),
                    g.start.clone(),
                    g.end.clone(),
                    g.lost.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                    g.reason.clone(),
                ]
            })
            .collect();
        print_table(&["source", "start", "end", "lost", "reason"], &rows)?;
    }
    Ok(())
}
