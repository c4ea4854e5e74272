//! The Docker source: one list of running containers, then dockerd's events stream (start,
//! die, destroy, rename) keeps one tail per running container. When dockerd goes away, the
//! events stream and the tails reconnect with backoff, resuming from their positions.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::tail::{FollowEnd, Streams, TailCtx, TailError, TailStats, follow};
use crate::pipeline::messages::Pos;
use crate::pipeline::messages::{ContainerInfo, ScanMsg, WriterMsg};
use crate::pipeline::metrics::counters;
use crate::pipeline::ratelimit::RateLimitedLog;
use crate::pipeline::service::Service;
use crate::pipeline::stage::StageTx;
use crate::scan::live::LiveRules;

/// First wait after a failure; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Timeout of bollard's requests (list, inspect), in seconds.
const REQUEST_TIMEOUT_S: u64 = 30;

/// Settings of the source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// dockerd's socket.
    pub socket: std::path::PathBuf,
    /// Labels naming workloads.
    pub workload_labels: Vec<String>,
    /// Cap on one line.
    pub max_line: usize,
}

counters! {
    /// Counters of discovery.
    pub struct SourceStats as "logscan_discovery" =>
    /// A copy of the source's counters for reports.
    SourceCounters {
        /// Tails running now.
        active_tails: Gauge,
        /// Container events handled.
        events: Counter,
        /// Times the events stream was (re)opened.
        connects: Counter,
        /// Tails started.
        tails_started: Counter,
    }
}

struct TailEntry {
    // Bumped on every event about the container, so a tail about to exit knows the
    // container was started again meanwhile.
    epoch: u64,
    notify: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

struct Shared {
    cfg: SourceConfig,
    docker: Docker,
    ctx: TailCtx,
    shards: Vec<StageTx<ScanMsg>>,
    // Container runs go to the writer (what sockets and flows are attributed to).
    runs: StageTx<WriterMsg>,
    cgroup_root: Option<std::path::PathBuf>,
    tails: Mutex<HashMap<String, TailEntry>>,
    positions: Mutex<HashMap<String, Pos>>,
    stats: Arc<SourceStats>,
    warn: Mutex<RateLimitedLog>,
}

/// Where the source sends: lines to the scan workers, container runs to the writer.
pub struct Outputs {
    /// One stage per scan worker; a container's lines go to `shards[hash(id) % len]`.
    pub shards: Vec<StageTx<ScanMsg>>,
    /// The writer's stage, for container runs (what sockets are attributed to).
    pub runs: StageTx<WriterMsg>,
}

/// The running source; dropping it does not stop it, [`DockerSource::stop`] does.
pub struct DockerSource {
    service: Service,
}

impl DockerSource {
    /// Starts discovery and tails on `rt`. `positions` are the saved cursors;
    /// lines go to the shards of `out`, container runs to its writer stage.
    pub fn start(
        rt: &Handle,
        cfg: SourceConfig,
        live: Arc<LiveRules>,
        out: Outputs,
        positions: HashMap<String, Pos>,
        stats: Arc<SourceStats>,
        tail_stats: Arc<TailStats>,
    ) -> Result<Self, bollard::errors::Error> {
        let docker = Docker::connect_with_unix(
            &cfg.socket.display().to_string(),
            REQUEST_TIMEOUT_S,
            bollard::API_DEFAULT_VERSION,
        )?;
        let shared = Arc::new(Shared {
            ctx: TailCtx {
                socket: cfg.socket.clone(),
                live,
                max_line: cfg.max_line,
                stats: tail_stats,
            },
            cfg,
            docker,
            shards: out.shards,
            runs: out.runs,
            cgroup_root: crate::pipeline::cgroups::v2_root(),
            tails: Mutex::new(HashMap::new()),
            positions: Mutex::new(positions),
            stats,
            warn: Mutex::new(RateLimitedLog::new(Duration::from_secs(60))),
        });
        let service = Service::spawn(rt, move |mut stopped| async move {
            tokio::select! {
                _ = discover(Arc::clone(&shared)) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            for (_, t) in shared.tails.lock().expect("tails lock").drain() {
                t.task.abort();
            }
        });
        Ok(DockerSource { service })
    }

    /// Stops every tail; lines already read are in the scan backlog.
    pub fn stop(self) {
        self.service.stop();
    }
}

impl Shared {
    fn shard(&self, id: &str) -> &StageTx<ScanMsg> {
        let h = id
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    fn warn(&self, what: &str, err: &dyn std::fmt::Display) {
        let mut w = self.warn.lock().expect("warn lock");
        if let Some(suppressed) = w.allow() {
            warn!(error = %err, suppressed, "{what}");
        } else {
            debug!(error = %err, "{what}");
        }
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, bollard::errors::Error> {
        match self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(c) => {
                let info = ContainerInfo::from_inspect(&c, &self.cfg.workload_labels);
                if let Some(run) = info
                    .as_ref()
                    .and_then(|i| super::containers::run_of(&c, i, self.cgroup_root.as_deref()))
                {
                    let _ = self
                        .runs
                        .send_async(WriterMsg::Container(Box::new(run)))
                        .await;
                }
                Ok(info)
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes sure a running container has a tail (a stopped one too when `started`: a
    /// short-lived container may be gone by the time its start event is read, and its log
    /// still has to be scanned); tells an existing tail something changed.
    fn ensure_tail(self: &Arc<Self>, c: ContainerInfo, started: bool) {
        let mut tails = self.tails.lock().expect("tails lock");
        if let Some(t) = tails.get_mut(&c.id) {
            // Only a start means "read again when the stream ends"; any event wakes a tail
            // that waits for rules.
            if started {
                t.epoch += 1;
            }
            t.notify.notify_one();
            return;
        }
        if !c.running && !started {
            return;
        }
        let notify = Arc::new(Notify::new());
        let id = c.id.clone();
        let task = tokio::spawn(tail(Arc::clone(self), Arc::new(c), Arc::clone(&notify)));
        tails.insert(
            id,
            TailEntry {
                epoch: 0,
                notify,
                task: task.abort_handle(),
            },
        );
        self.stats
            .active_tails
            .store(tails.len() as u64, Ordering::Relaxed);
        self.stats.tails_started.fetch_add(1, Ordering::Relaxed);
    }

    fn epoch(&self, id: &str) -> u64 {
        self.tails
            .lock()
            .expect("tails lock")
            .get(id)
            .map(|t| t.epoch)
            .unwrap_or(0)
    }

    /// Removes the tail of `id` unless an event arrived since `epoch`; returns whether it did.
    fn retire(&self, id: &str, epoch: u64) -> bool {
        let mut tails = self.tails.lock().expect("tails lock");
        if tails.get(id).is_some_and(|t| t.epoch != epoch) {
            return false;
        }
        tails.remove(id);
        self.stats
            .active_tails
            .store(tails.len() as u64, Ordering::Relaxed);
        true
    }

    async fn handle_event(self: &Arc<Self>, action: &str, id: &str) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        match action {
            "destroy" => {
                if let Some(t) = self.tails.lock().expect("tails lock").remove(id) {
                    t.task.abort();
                }
                self.positions.lock().expect("positions lock").remove(id);
                let shard = self.shard(id);
                let _ = shard.send_async(ScanMsg::Removed(id.to_string())).await;
            }
            "rename" => {
                // The workload names changed: restart the tail with the new ones, from the
                // position its lines were handed over at.
                if let Some(t) = self.tails.lock().expect("tails lock").remove(id) {
                    t.task.abort();
                }
                self.start_tail(id, false).await;
            }
            "start" => self.start_tail(id, true).await,
            // "die" included: the inspection records the run's end.
            _ => self.start_tail(id, false).await,
        }
    }

    async fn start_tail(self: &Arc<Self>, id: &str, started: bool) {
        match self.inspect(id).await {
            Ok(Some(c)) => self.ensure_tail(c, started),
            Ok(None) => {}
            Err(e) => self.warn("could not inspect a container", &e),
        }
    }
}

async fn discover(sh: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    let mut since: Option<i64> = None;
    loop {
        // Events from just before the list on, so no start falls between the two.
        let from = since.unwrap_or_else(|| chrono::Utc::now().timestamp() - 1);
        let filters: HashMap<String, Vec<String>> = [
            ("type".to_string(), vec!["container".to_string()]),
            (
                "event".to_string(),
                ["start", "die", "destroy", "rename"]
                    .map(String::from)
                    .to_vec(),
            ),
        ]
        .into();
        let mut events = sh.docker.events(Some(EventsOptions {
            since: Some(from.to_string()),
            until: None,
            filters: Some(filters),
        }));
        match sh
            .docker
            .list_containers(Some(ListContainersOptions::default()))
            .await
        {
            Ok(list) => {
                sh.stats.connects.fetch_add(1, Ordering::Relaxed);
                info!(running = list.len(), "dockerd reached");
                backoff = BACKOFF_MIN;
                for c in list {
                    if let Some(id) = c.id {
                        sh.start_tail(&id, false).await;
                    }
                }
            }
            Err(e) => {
                sh.warn("could not list containers (dockerd down?)", &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        since = Some(from);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(msg) => {
                    if let Some(t) = msg.time {
                        since = Some(t);
                    }
                    let (Some(action), Some(id)) = (msg.action, msg.actor.and_then(|a| a.id))
                    else {
                        continue;
                    };
                    debug!(action, id, "container event");
                    sh.handle_event(&action, &id).await;
                }
                Err(e) => {
                    sh.warn("the dockerd events stream broke; reconnecting", &e);
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One container's tail: follows its log across stream ends, rule changes and dockerd
/// restarts until the container is stopped or removed.
async fn tail(sh: Arc<Shared>, c: Arc<ContainerInfo>, notify: Arc<Notify>) {
    let shard = sh.shard(&c.id).clone();
    let mut rules = sh.ctx.live.watch();
    let mut pos = sh
        .positions
        .lock()
        .expect("positions lock")
        .get(&c.id)
        .copied();
    let mut backoff = BACKOFF_MIN;
    loop {
        let epoch = sh.epoch(&c.id);
        let streams = Streams::wanted(&sh.ctx.live, &c);
        let ended = if streams.none() {
            // No rule reads this container: open nothing, and start after what it logs
            // until one does.
            tokio::select! {
                _ = rules.changed() => {}
                _ = notify.notified() => {}
            }
            pos = Some(later(pos, now_pos()));
            FollowEnd::StreamEnded
        } else {
            let r = follow(&sh.ctx, &c, streams, &mut pos, &shard, &mut rules).await;
            if let Some(p) = pos {
                sh.positions
                    .lock()
                    .expect("positions lock")
                    .insert(c.id.clone(), p);
            }
            match r {
                Ok(end) => {
                    backoff = BACKOFF_MIN;
                    end
                }
                Err(TailError::Closed) => return,
                Err(e) => {
                    sh.ctx.stats.stream_errors.fetch_add(1, Ordering::Relaxed);
                    sh.warn("a container log stream failed; retrying", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    FollowEnd::StreamEnded
                }
            }
        };
        if ended == FollowEnd::StreamsChanged {
            continue;
        }
        match sh.inspect(&c.id).await {
            Ok(Some(now)) if now.running => {
                if now.workloads != c.workloads {
                    // Renamed while we were not looking: restart with the new names.
                    if sh.retire(&c.id, epoch) {
                        sh.ensure_tail(now, false);
                        return;
                    }
                }
            }
            Ok(_) => {
                if sh.retire(&c.id, epoch) {
                    debug!(container = %c.name, "container stopped; tail ends");
                    return;
                }
            }
            Err(e) => {
                sh.warn("could not inspect a container (dockerd down?)", &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn now_pos() -> Pos {
    Pos {
        ts_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX),
        // Rank 0: every record at this very instant is still to be read.
        rank: 0,
        digest: 0,
    }
}

fn later(a: Option<Pos>, b: Pos) -> Pos {
    match a {
        Some(a) if (a.ts_ns, a.rank) >= (b.ts_ns, b.rank) => a,
        _ => b,
    }
}
