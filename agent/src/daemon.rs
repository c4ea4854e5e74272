//! `nattrail run`: wires the conntrack reader to the writer and handles signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tracing::{error, info};

use crate::config::Config;
use crate::conntrack::reader::{Reader, ReaderConfig, ReaderStats};
use crate::conntrack::sysctl;
use crate::store::writer::{Writer, WriterConfig, WriterStats};

/// Runs the agent until SIGINT or SIGTERM; then flushes and closes the database.
pub fn run(cfg: Config) -> Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }

    let writer_cfg = WriterConfig {
        db_path: cfg.db_path.clone(),
        batch_rows: cfg.store.batch_rows,
        commit_interval: Duration::from_millis(cfg.store.commit_interval_ms),
    };
    let writer_stats = Arc::new(WriterStats::default());
    let writer = Writer::open(&writer_cfg, Arc::clone(&writer_stats))
        .with_context(|| format!("opening the trail {}", cfg.db_path.display()))?;
    let alive_until_ns = writer.previous_session_end_ns();
    info!(db = %cfg.db_path.display(), session = writer.session_id(), "trail open");

    let applied = if cfg.conntrack.enabled {
        sysctl::Wanted {
            events: cfg.conntrack.set_events,
            acct: cfg.conntrack.set_acct,
            timestamp: cfg.conntrack.set_timestamp,
        }
        .apply()
        .context("setting conntrack sysctls")?
    } else {
        Vec::new()
    };

    let (tx, rx) = crossbeam_channel::bounded(cfg.conntrack.channel_capacity);
    let writer_thread = thread::Builder::new()
        .name("writer".into())
        .spawn(move || writer.run(rx, &writer_cfg))
        .context("starting the writer thread")?;

    let reader_stats = Arc::new(ReaderStats::default());
    // Set by the reader after its start-up dump; without conntrack there is nothing to wait for.
    let ready = Arc::new(AtomicBool::new(!cfg.conntrack.enabled));
    let reader_thread = if cfg.conntrack.enabled {
        let reader = Reader::open(
            ReaderConfig {
                rcvbuf_bytes: cfg.conntrack.rcvbuf_bytes,
                filter: cfg.conntrack.filter,
                dump_at_start: cfg.conntrack.dump_at_start,
                alive_until_ns,
            },
            tx,
            Arc::clone(&reader_stats),
        )
        .context("opening the conntrack event socket")?;
        let stop = Arc::clone(&shutdown);
        let ready = Arc::clone(&ready);
        Some(
            thread::Builder::new()
                .name("conntrack".into())
                .spawn(move || reader.run(stop, ready))
                .context("starting the conntrack reader thread")?,
        )
    } else {
        drop(tx);
        None
    };
    let mut failure = None;
    let mut announced = false;
    while !shutdown.load(Ordering::Relaxed) {
        if !announced && ready.load(Ordering::Relaxed) {
            info!("nattrail running");
            announced = true;
        }
        if reader_thread.as_ref().is_some_and(|t| t.is_finished()) || writer_thread.is_finished() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    shutdown.store(true, Ordering::Relaxed);
    info!("stopping");
    if let Some(t) = reader_thread {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "conntrack reader failed");
                failure = Some(anyhow!("conntrack reader failed: {e}"));
            }
            Err(_) => failure = Some(anyhow!("conntrack reader panicked")),
        }
    }
    match writer_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            error!(error = %e, "writer failed");
            failure = Some(anyhow!("writer failed: {e}"));
        }
        Err(_) => failure = Some(anyhow!("writer panicked")),
    }
    if cfg.conntrack.restore_sysctls {
        sysctl::restore(&applied);
    }
    info!(
        rows = writer_stats.rows.load(Ordering::Relaxed),
        decoded = reader_stats.decoded.load(Ordering::Relaxed),
        overflows = reader_stats.overflows.load(Ordering::Relaxed),
        "nattrail stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
