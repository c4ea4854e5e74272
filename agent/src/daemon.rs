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
use crate::api::triggers::TriggerAccess;
use crate::config::Config;
use crate::conntrack::reader::{GAP_SOURCE_BACKLOG, Reader, ReaderConfig, ReaderStats};
use crate::conntrack::sysctl;
use crate::docker::logscan::LogScan;
use crate::docker::source::{DockerSource, Outputs, SourceConfig};
use crate::ebpf::source::{EbpfSource, EbpfSourceConfig, EbpfStats};
use crate::pipeline::messages::ScanMsg;
use crate::pipeline::messages::{LogEvent, WriterMsg};
use crate::pipeline::metrics::Metrics;
use crate::pipeline::registry::Registry;
use crate::pipeline::stage::StageTx;
use crate::pipeline::stage::{Overflow, StageConfig, stage};
use crate::scan::engine::{MAX_MESSAGE, cut_message};
use crate::scan::worker::{self, WorkerConfig};
use crate::status::{self, StatusSource};
use crate::store::cursors;
use crate::store::writer::{Writer, WriterConfig, WriterStats};
use crate::triggers::delivery::DeliveryConfig;
use crate::triggers::dispatcher::{self, DispatchConfig};
use crate::triggers::ssrf::Guard;

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
    let recent_gaps = writer.recent_gaps();
    let bus = writer.bus();
    let database = writer.database();
    info!(db = %cfg.db_path.display(), session = writer.session_id(), "trail open");
    let logscan = {
        let conn = database.connect().context("connecting to the trail")?;
        Arc::new(LogScan::load(&conn).context("loading the log-scan rules")?)
    };

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

    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(Arc::clone(&metrics)));
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
    // Log hits and agent events have a stage of their own: it waits when full (dockerd keeps
    // the logs), and the writer serves conntrack first, so a burst of hits never turns into
    // conntrack loss, and each stage's counters are its own source's.
    let (log_tx, log_rx, log_handle) = stage(StageConfig {
        max_wait: Duration::from_millis(cfg.pipeline.max_wait_ms),
        warn_interval: Duration::from_secs(cfg.pipeline.warn_interval_secs),
        ..StageConfig::new("logs->writer", cfg.docker.channel_capacity, Overflow::Wait)
    });
    registry.add(log_handle);
    // eBPF records wait when their stage is full: they queue in the ring buffer, whose
    // overflow the programs count exactly (a gap of source `ebpf`).
    let (ebpf_tx, ebpf_rx, ebpf_handle) = stage(StageConfig {
        max_wait: Duration::from_millis(cfg.pipeline.max_wait_ms),
        warn_interval: Duration::from_secs(cfg.pipeline.warn_interval_secs),
        ..StageConfig::new("ebpf->writer", cfg.ebpf.channel_capacity, Overflow::Wait)
    });
    registry.add(ebpf_handle);
    let writer_thread = thread::Builder::new()
        .name("writer".into())
        .spawn(move || writer.serve(&[rx, log_rx, ebpf_rx], &writer_cfg))
        .context("starting the writer thread")?;
    let ebpf_stats = Arc::new(EbpfStats::default());
    let (ebpf, ebpf_error) = start_ebpf(&cfg, ebpf_tx, &ebpf_stats);

    // One runtime for everything async (the API, the Docker source, the dispatcher): two
    // workers, whatever is enabled. The conntrack reader, the writer and the scan workers
    // are plain threads: they block on netlink, DuckDB and the regex engine.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nattrail-async")
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    // One SSRF guard for deliveries and for the API's checks of new trigger URLs.
    let guard = Arc::new(Guard::new(cfg.webhooks.allow.clone()));
    let dispatch = if cfg.webhooks.enabled {
        let w = &cfg.webhooks;
        Some(
            dispatcher::start(
                rt.handle(),
                Arc::clone(&database),
                &bus,
                Arc::clone(&guard),
                DispatchConfig {
                    queue_capacity: w.queue_capacity,
                    workers: w.workers,
                    delivery: DeliveryConfig {
                        timeout: Duration::from_millis(w.timeout_ms),
                        max_attempts: w.max_attempts.max(1),
                        ..DeliveryConfig::default()
                    },
                    grace: Duration::from_millis(w.shutdown_grace_ms),
                },
            )
            .context("starting the trigger dispatcher")?,
        )
    } else {
        None
    };
    // Rules stored with a pattern this build cannot compile (written by another version or
    // by hand) are reported as agent events, once the dispatcher listens.
    for e in logscan.live.load().errors() {
        let _ = log_tx.send_wait(WriterMsg::Event(LogEvent {
            ts_ns: crate::pipeline::clock::now_ns(),
            source: "agent",
            severity: "error",
            message: cut_message(
                &format!("log-scan rule {} does not compile: {}", e.rule_id, e.error),
                MAX_MESSAGE,
            ),
            metadata: serde_json::json!({"kind": "rule_compile_error", "rule_id": e.rule_id, "error": e.error}),
        }));
    }
    let (docker, scan_workers) = if cfg.docker.enabled {
        start_log_scan(rt.handle(), &cfg, &logscan, &database, &log_tx, &registry)?
    } else {
        (None, Vec::new())
    };

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
    let mut source = StatusSource::new(
        Arc::clone(&registry),
        metrics,
        Arc::clone(&reader_stats),
        Arc::clone(&writer_stats),
        recent_gaps,
        Some(Arc::clone(&logscan)),
    );
    source.with_database(&cfg.db_path);
    if cfg.ebpf.enabled {
        source.with_ebpf(Arc::clone(&ebpf_stats), ebpf_error);
    }
    if let Some(d) = &dispatch {
        source.with_webhooks(Arc::clone(&d.dispatcher.stats));
    }
    let api = if cfg.api.enabled && !(cfg.api.listen.is_empty() && cfg.api.socket.is_empty()) {
        let token_path = token::path(&cfg.api, &cfg.db_path);
        let token = token::load_or_create(&token_path).with_context(|| {
            format!("reading or creating the API token {}", token_path.display())
        })?;
        let conns = Arc::new(crate::status::ApiConnStats::default());
        source.with_api(Arc::clone(&conns));
        let state = ApiState::new(
            Arc::clone(&database),
            source.clone(),
            Limits::from_config(&cfg.api),
            TriggerAccess {
                guard: Arc::clone(&guard),
                dispatcher: dispatch.as_ref().map(|d| Arc::clone(&d.dispatcher)),
            },
        );
        Some(ApiServer::start(
            rt.handle(),
            &cfg.api,
            state,
            token,
            conns,
        )?)
    } else {
        None
    };
    let mut status_log = RateLimitedLog::new(Duration::from_secs(600));
    let mut last_status = Instant::now() - STATUS_EVERY;
    while !shutdown.load(Ordering::Relaxed) {
        if !announced && ready.load(Ordering::Relaxed) {
            info!("nattrail running");
            announced = true;
            // systemd's Type=notify: ready once the start-up dump is in the trail. Outside
            // systemd there is no NOTIFY_SOCKET and this does nothing.
            if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
                warn!(error = %e, "could not tell systemd the agent is ready");
            }
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
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // The daemon's own sender kept the writer open while no source ran (conntrack off); the
    // writer drains and stops once the sources' senders are gone too.
    if let Some(api) = api {
        api.stop();
    }
    if let Some(e) = ebpf {
        e.stop();
    }
    // Tails first: the workers then drain what was read, save the last positions and let
    // go of the writer.
    if let Some(d) = docker {
        d.stop();
    }
    for w in scan_workers {
        if w.join().is_err() {
            failure = Some(anyhow!("a scan worker panicked"));
        }
    }
    drop(tx);
    drop(log_tx);
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
    // After the writer: its last commits are published to the bus and still matched.
    if let Some(d) = dispatch {
        d.stop();
    }
    registry.report();
    if let Err(e) = status::write(&cfg.db_path, &source.snapshot(false)) {
        warn!(error = %e, "could not write the status snapshot");
    }
    // Every service has stopped; what is left (idle keep-alive connections) goes now.
    rt.shutdown_timeout(Duration::from_secs(1));
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

type ScanWorkers = Vec<thread::JoinHandle<()>>;

/// Starts the scan workers and the Docker source (discovery and tails).
/// Loads the eBPF programs the config asks for. A refusal (no CAP_BPF, an old kernel, a
/// container) is one clear line per program and a reason in `status`; the rest of the agent
/// runs on.
fn start_ebpf(
    cfg: &Config,
    tx: StageTx<WriterMsg>,
    stats: &Arc<EbpfStats>,
) -> (Option<EbpfSource>, Option<String>) {
    if !cfg.ebpf.enabled || (!cfg.ebpf.exec && !cfg.ebpf.sockets) {
        return (None, None);
    }
    let mut errors = Vec::new();
    let socket_cgroup = if cfg.ebpf.sockets {
        let root = crate::pipeline::cgroups::v2_root();
        if root.is_none() {
            let e = "socket programs: no cgroup-v2 hierarchy is mounted (started by `ip netns exec`? it hides /sys/fs/cgroup; `nsenter --net` does not)";
            warn!("eBPF program not loaded: socket owners are not recorded: {e}");
            errors.push(e.to_string());
        }
        root
    } else {
        None
    };
    let source_cfg = EbpfSourceConfig {
        exec_program: cfg.ebpf.exec.then(|| cfg.ebpf.exec_program.clone()),
        fork_exit: cfg.ebpf.fork_exit,
        socket_cgroup,
    };
    let started = EbpfSource::start(&source_cfg, tx, Arc::clone(stats));
    for (what, e) in &started.refused {
        warn!(error = %e, "eBPF program not loaded: {what} are not recorded (the conntrack trail and the log scanner run on)");
        errors.push(e.to_string());
    }
    if started.processes {
        info!(program = %cfg.ebpf.exec_program, "eBPF exec program attached: process executions are recorded");
    }
    if started.sockets {
        info!("eBPF socket programs attached: socket owners are recorded");
    }
    let source = started.source;
    (source, (!errors.is_empty()).then(|| errors.join("; ")))
}

fn start_log_scan(
    rt: &tokio::runtime::Handle,
    cfg: &Config,
    logscan: &Arc<LogScan>,
    database: &Arc<crate::store::database::Database>,
    writer: &StageTx<WriterMsg>,
    registry: &Registry,
) -> Result<(Option<DockerSource>, ScanWorkers)> {
    let d = &cfg.docker;
    // A gateway without dockerd (or without access to it) keeps its NAT trail: log scanning
    // is off, said once, rather than the agent refusing to start.
    if let Err(e) = std::os::unix::net::UnixStream::connect(&d.socket) {
        warn!(
            socket = %d.socket.display(),
            error = %e,
            "dockerd is not reachable: container log scanning is off (restart the agent once dockerd runs)"
        );
        return Ok((None, Vec::new()));
    }
    let positions = {
        let conn = database.connect().context("connecting to the trail")?;
        cursors::load(&conn).context("loading the log cursors")?
    };
    let worker_cfg = WorkerConfig {
        hits_per_sec: d.hits_per_sec.try_into().context("docker.hits_per_sec")?,
        hits_burst: d.hits_burst.try_into().context("docker.hits_burst")?,
        cursor_interval: Duration::from_millis(d.cursor_interval_ms),
    };
    let mut shards = Vec::new();
    let mut workers = Vec::new();
    for i in 0..d.scan_workers {
        // Stage names live as long as the agent: one small leak per worker at start.
        let name: &'static str = Box::leak(format!("docker->scan{i}").into_boxed_str());
        // dockerd keeps the logs: a full backlog makes the tails wait, it never drops.
        let (stx, srx, handle) = stage::<ScanMsg>(StageConfig {
            max_wait: Duration::from_millis(cfg.pipeline.max_wait_ms),
            warn_interval: Duration::from_secs(cfg.pipeline.warn_interval_secs),
            ..StageConfig::new(name, d.channel_capacity, Overflow::Wait)
        });
        registry.add(handle);
        shards.push(stx);
        let (writer, live, stats, wc) = (
            writer.clone(),
            Arc::clone(&logscan.live),
            Arc::clone(&logscan.scan),
            worker_cfg.clone(),
        );
        workers.push(
            thread::Builder::new()
                .name(format!("scan{i}"))
                .spawn(move || worker::run(srx, writer, live, stats, wc))
                .context("starting a scan worker")?,
        );
    }
    let source = DockerSource::start(
        rt,
        SourceConfig {
            socket: d.socket.clone(),
            workload_labels: d.workload_labels.clone(),
            max_line: d.max_line_bytes,
        },
        Arc::clone(&logscan.live),
        Outputs {
            shards,
            runs: writer.clone(),
        },
        positions,
        Arc::clone(&logscan.source),
        Arc::clone(&logscan.tails),
    )
    .with_context(|| format!("connecting to dockerd at {}", d.socket.display()))?;
    info!(workers = d.scan_workers, socket = %d.socket.display(), "log scanning started");
    Ok((Some(source), workers))
}
