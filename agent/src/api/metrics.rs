//! `/metrics`: every pipeline, reader and writer counter in the Prometheus text format.

use std::fmt::Write;

use crate::pipeline::stage::StageSnapshot;
use crate::status::{AgentStatus, DatabaseInfo};

/// A per-stage metric: name, type, help, and how to read it from a stage.
type StageMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&StageSnapshot) -> f64,
);

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the exposition text.
pub fn render(s: &AgentStatus, db: &DatabaseInfo) -> String {
    let mut out = String::new();
    let stage_metrics: [StageMetric; 7] = [
        (
            "nattrail_stage_received_total",
            "counter",
            "Items offered to the stage by its producers.",
            |s| s.received as f64,
        ),
        (
            "nattrail_stage_forwarded_total",
            "counter",
            "Items that entered the stage's channel.",
            |s| s.forwarded as f64,
        ),
        (
            "nattrail_stage_dropped_total",
            "counter",
            "Items dropped because the channel stayed full.",
            |s| s.dropped as f64,
        ),
        (
            "nattrail_stage_throttled_seconds_total",
            "counter",
            "Time producers spent throttled, in seconds (Prometheus base unit).",
            |s| s.throttled_ms as f64 / 1000.0,
        ),
        (
            "nattrail_stage_depth",
            "gauge",
            "Items in the channel now.",
            |s| s.depth as f64,
        ),
        (
            "nattrail_stage_peak_depth",
            "gauge",
            "Highest depth seen.",
            |s| s.peak_depth as f64,
        ),
        (
            "nattrail_stage_capacity",
            "gauge",
            "Channel capacity.",
            |s| s.capacity as f64,
        ),
    ];
    for (name, kind, help, get) in stage_metrics {
        family(&mut out, name, kind, help);
        for st in &s.stages {
            let _ = writeln!(out, "{name}{{stage=\"{}\"}} {}", label(&st.name), get(st));
        }
    }
    let c = &s.conntrack;
    for (name, help, v) in [
        (
            "nattrail_conntrack_datagrams_total",
            "Datagrams read from the event socket.",
            c.datagrams,
        ),
        (
            "nattrail_conntrack_decoded_total",
            "Flow messages decoded.",
            c.decoded,
        ),
        (
            "nattrail_conntrack_decode_errors_total",
            "Undecodable messages skipped.",
            c.decode_errors,
        ),
        (
            "nattrail_conntrack_filtered_total",
            "Flows left out by the capture filter.",
            c.filtered,
        ),
        (
            "nattrail_conntrack_forwarded_total",
            "Events handed to the writer stage.",
            c.forwarded,
        ),
        (
            "nattrail_conntrack_overflows_total",
            "ENOBUFS on the event socket.",
            c.overflows,
        ),
        (
            "nattrail_conntrack_kernel_dropped_total",
            "Events the kernel dropped on our socket.",
            c.kernel_dropped,
        ),
        (
            "nattrail_conntrack_dumped_total",
            "Entries received from table dumps.",
            c.dumped,
        ),
        (
            "nattrail_conntrack_resyncs_total",
            "Resyncs after a loss.",
            c.resyncs,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    let w = &s.writer;
    for (name, kind, help, v) in [
        (
            "nattrail_writer_rows_total",
            "counter",
            "Rows committed.",
            w.rows,
        ),
        (
            "nattrail_writer_commits_total",
            "counter",
            "Commits.",
            w.commits,
        ),
        (
            "nattrail_writer_duplicates_total",
            "counter",
            "Entries skipped as already open.",
            w.duplicates,
        ),
        (
            "nattrail_writer_reconciled_total",
            "counter",
            "Flows closed with an inexact end.",
            w.reconciled,
        ),
        (
            "nattrail_writer_gaps_total",
            "counter",
            "Capture gaps recorded.",
            w.gaps,
        ),
        (
            "nattrail_writer_events_total",
            "counter",
            "Event-log rows written.",
            w.events,
        ),
        (
            "nattrail_writer_open_flows",
            "gauge",
            "Flows open in the trail.",
            w.open_flows,
        ),
        (
            "nattrail_database_size_bytes",
            "gauge",
            "Size of the DuckDB file.",
            db.size_bytes,
        ),
        (
            "nattrail_database_wal_bytes",
            "gauge",
            "Size of its write-ahead log.",
            db.wal_bytes,
        ),
    ] {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    if let Some(l) = &s.logscan {
        let t = &l.tails;
        for (name, kind, help, v) in [
            (
                "nattrail_logscan_lines_total",
                "counter",
                "Log lines scanned.",
                l.lines_seen,
            ),
            (
                "nattrail_logscan_hits_total",
                "counter",
                "Log-rule hits stored.",
                l.hits,
            ),
            (
                "nattrail_logscan_suppressed_cooldown_total",
                "counter",
                "Matches held back by a rule's cooldown.",
                l.suppressed_cooldown,
            ),
            (
                "nattrail_logscan_suppressed_bucket_total",
                "counter",
                "Matches held back by a container's token bucket.",
                l.suppressed_bucket,
            ),
            (
                "nattrail_logscan_active_tails",
                "gauge",
                "Container logs followed now.",
                l.active_tails,
            ),
            (
                "nattrail_logscan_compile_errors",
                "gauge",
                "Rules whose pattern does not compile.",
                l.compile_errors.len() as u64,
            ),
            (
                "nattrail_logscan_truncated_lines_total",
                "counter",
                "Lines cut at the cap.",
                t.truncated,
            ),
            (
                "nattrail_logscan_skipped_bytes_total",
                "counter",
                "Bytes skipped past the line cap or in refused frames.",
                t.skipped_bytes,
            ),
            (
                "nattrail_logscan_invalid_utf8_total",
                "counter",
                "Lines whose invalid UTF-8 was replaced.",
                t.invalid_utf8,
            ),
            (
                "nattrail_logscan_oversized_frames_total",
                "counter",
                "Frames over 16 MiB refused.",
                t.oversized_frames,
            ),
            (
                "nattrail_logscan_stream_errors_total",
                "counter",
                "Log streams that failed (dockerd down, HTTP errors).",
                t.stream_errors,
            ),
        ] {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
    out
}
