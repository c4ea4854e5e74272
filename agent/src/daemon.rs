//! `nattrail run`: wires the conntrack reader to the writer and handles signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tracing::{error, info, warn};

use crate::pipeline::ratelimit::RateLimitedLog;

/// How often the status snapshot is rewritten.
const STATUS_EVERY: Duration = Duration::from_secs(1);

use crate::api::routes::{ApiState, Limits};
use crate::api::server::ApiServer;
use crate::api::token;
use crate::config::Config;
use crate::conntrack::reader::{GAP_SOURCE_BACKLOG, Reader, ReaderConfig, ReaderStats};
use crate::conntrack::sysctl;
use crate::pipeline::registry::Registry;
use crate::pipeline::stage::{Overflow, StageConfig, stage};
use crate::status::{self, StatusSource};
use crate::store::writer::{Writer, WriterConfig, WriterStats};

/// Runs the agent until SIGINT or SIGTERM; then flushes and closes the database.
pub fn run(cfg: Config) -> Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }

    let writer_cfg = WriterConfig::from_config(&cfg);
    let writer_stats = Arc::new(WriterStats::default());
    let writer = Writer::open(&writer_cfg, Arc::clone(&writer_stats))
        .with_context(|| format!("opening the trail {}", cfg.db_path.display()))?;
    let alive_until_ns = writer.previous_session_end_ns();
    let database = writer.database();
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

    let registry = Arc::new(Registry::default());
    // netlink cannot be paused: past a short throttle the reader drops the newest event,
    // counts it, and repairs the trail with a dump once the writer has caught up.
    let (tx, rx, handle) = stage(StageConfig {
        max_wait: Duration::from_millis(cfg.pipeline.max_wait_ms),
        warn_interval: Duration::from_secs(cfg.pipeline.warn_interval_secs),
        ..StageConfig::new(
            GAP_SOURCE_BACKLOG,
            cfg.conntrack.channel_capacity,
            Overflow::DropNewest,
        )
    });
    registry.add(handle);
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
            tx.clone(),
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
        None
    };
    let mut failure = None;
    let mut announced = false;
    let source = StatusSource::new(
        Arc::clone(&registry),
        Arc::clone(&reader_stats),
        Arc::clone(&writer_stats),
    );
    let api = if cfg.api.enabled && !(cfg.api.listen.is_empty() && cfg.api.socket.is_empty()) {
        let token_path = cfg.api.token_path(&cfg.db_path);
        let token = token::load_or_create(&token_path).with_context(|| {
            format!("reading or creating the API token {}", token_path.display())
        })?;
        let state = ApiState {
            db: Arc::clone(&database),
            status: source.clone(),
            limits: Limits {
                max_body_bytes: cfg.api.max_body_bytes,
                sql_row_limit: cfg.api.sql_row_limit,
                sql_timeout: Duration::from_millis(cfg.api.sql_timeout_ms),
            },
        };
        Some(ApiServer::start(&cfg.api, state, token)?)
    } else {
        None
    };
    let mut status_log = RateLimitedLog::new(Duration::from_secs(600));
    let mut last_status = Instant::now() - STATUS_EVERY;
    while !shutdown.load(Ordering::Relaxed) {
        if !announced && ready.load(Ordering::Relaxed) {
            info!("nattrail running");
            announced = true;
        }
        if reader_thread.as_ref().is_some_and(|t| t.is_finished()) || writer_thread.is_finished() {
            break;
        }
        registry.report();
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            if let Err(e) = status::write(&cfg.db_path, &source.snapshot(true))
                && status_log.allow().is_some()
            {
                warn!(error = %e, "could not write the status snapshot");
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    shutdown.store(true, Ordering::Relaxed);
    info!("stopping");
    // The daemon's own sender kept the writer open while no source ran (conntrack off); the
    // writer drains and stops once the sources' senders are gone too.
    drop(tx);
    if let Some(api) = api {
        api.stop();
    }
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
    registry.report();
    if let Err(e) = status::write(&cfg.db_path, &source.snapshot(false)) {
        warn!(error = %e, "could not write the status snapshot");
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
