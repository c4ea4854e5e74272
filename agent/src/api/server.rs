//! Serving the router on TCP and, optionally, a Unix socket, on a runtime of its own thread.
//!
//! The accept loop is ours rather than `axum::serve` because the API faces local users who
//! may be hostile: every connection must send its request headers within
//! `[api] header_timeout_ms`, open connections are capped (`max_connections` per listener),
//! and a full house evicts the oldest connection that has not yet sent a request. A token
//! holder's connection sends its headers at once, so clients that trickle bytes or sit idle
//! can neither exhaust the agent nor lock it out.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::sync::watch;
use tracing::{debug, info};

use super::auth::Via;
use super::routes::{ApiState, router};
use crate::config::ApiConfig;
use crate::pipeline::service::Service;
use crate::status::ApiConnStats;

/// Errors of starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// The runtime or a listener could not be set up.
    #[error("starting the HTTP API on {what}: {source}")]
    Bind {
        /// Address or socket path.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The socket's directory is not one the agent may serve from.
    #[error("the API socket's directory {dir}: {reason}")]
    SocketDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The open connections of one listener: a cap, and the order in which those that have not
/// sent a request yet arrived (the ones a full house evicts).
struct Slots {
    cap: usize,
    inner: Mutex<SlotsInner>,
    stats: Arc<ApiConnStats>,
}

#[derive(Default)]
struct SlotsInner {
    open: usize,
    next_id: u64,
    idle: VecDeque<(u64, Arc<Notify>)>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more connection, with the signal that evicts it. A full house tells its
    /// oldest idle connection to go (it closes at once and gives its slot back); with none
    /// idle, every connection is serving a request and the new one is refused.
    fn admit(&self) -> Option<(u64, Arc<Notify>)> {
        let mut s = self.lock();
        if s.open >= self.cap {
            let (_, victim) = s.idle.pop_front()?;
            victim.notify_one();
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
        s.open += 1;
        s.next_id += 1;
        let (id, evict) = (s.next_id, Arc::new(Notify::new()));
        s.idle.push_back((id, Arc::clone(&evict)));
        Some((id, evict))
    }

    /// The connection sent a request: it is no longer a candidate for eviction.
    fn busy(&self, id: u64) {
        self.lock().idle.retain(|(i, _)| *i != id);
    }

    /// The connection answered its request and waits for another: evictable again.
    fn rest(&self, id: u64, evict: &Arc<Notify>) {
        self.lock().idle.push_back((id, Arc::clone(evict)));
    }

    /// The connection ended.
    fn close(&self, id: u64) {
        let mut s = self.lock();
        s.idle.retain(|(i, _)| *i != id);
        s.open -= 1;
    }
}

/// A running API server; stops when dropped or on `stop`.
pub struct ApiServer {
    service: Option<Service>,
    socket: Option<PathBuf>,
}

/// How long one connection may take, set by `[api]`.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    header_timeout: Duration,
    max_connections: usize,
}

/// Makes the socket's directory: created 0750 when absent; when present it must be ours
/// and closed to others (group members of the agent may reach the socket, nobody else).
fn socket_dir(p: &std::path::Path) -> Result<(), ApiStartError> {
    let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let bad = |reason: String| ApiStartError::SocketDir {
        dir: dir.to_path_buf(),
        reason,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|e| bad(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .map_err(|e| bad(e.to_string()))?;
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    use std::os::unix::fs::MetadataExt;
    if m.file_type().is_symlink() {
        return Err(bad("is a symbolic link".into()));
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(bad(format!(
            "owned by uid {}, not by the agent; use a directory of the agent's (e.g. /run/nattrail)",
            m.uid()
        )));
    }
    if m.mode() & 0o007 != 0 {
        return Err(bad(format!(
            "mode {:04o} lets every local user reach the socket; it must be 0750 or closer",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

impl ApiServer {
    /// Binds the configured listeners and serves on `rt` until stopped.
    pub fn start(
        rt: &Handle,
        cfg: &ApiConfig,
        state: ApiState,
        token: String,
        stats: Arc<ApiConnStats>,
    ) -> Result<Self, ApiStartError> {
        let app = router(
            state,
            Arc::new(token),
            Duration::from_millis(cfg.request_timeout_ms),
        );
        let limits = ConnLimits {
            header_timeout: Duration::from_millis(cfg.header_timeout_ms.max(1)),
            max_connections: cfg.max_connections.max(1),
        };
        let tcp = if cfg.listen.is_empty() {
            None
        } else {
            let l = rt
                .block_on(tokio::net::TcpListener::bind(&cfg.listen))
                .map_err(|source| ApiStartError::Bind {
                    what: cfg.listen.clone(),
                    source,
                })?;
            info!(listen = %cfg.listen, "HTTP API listening");
            Some(l)
        };
        let socket = (!cfg.socket.is_empty()).then(|| PathBuf::from(&cfg.socket));
        let unix = match &socket {
            None => None,
            Some(p) => {
                socket_dir(p)?;
                // A socket file left by a crash would make bind fail.
                let _ = std::fs::remove_file(p);
                let l = rt
                    .block_on(async { tokio::net::UnixListener::bind(p) })
                    .map_err(|source| ApiStartError::Bind {
                        what: p.display().to_string(),
                        source,
                    })?;
                // The agent's group may connect (the CLI of its operators); the directory
                // keeps everyone else out.
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660)).map_err(
                    |source| ApiStartError::Bind {
                        what: p.display().to_string(),
                        source,
                    },
                )?;
                info!(socket = %p.display(), "HTTP API listening on a Unix socket");
                Some(l)
            }
        };
        let service = Service::spawn(rt, move |stopped| async move {
            let mut tasks = Vec::new();
            let serve = |via| Serving {
                app: app.clone(),
                via,
                limits,
                stats: Arc::clone(&stats),
                stopped: stopped.clone(),
            };
            if let Some(l) = tcp {
                tasks.push(tokio::spawn(accept_loop(l, serve(Via::Tcp))));
            }
            if let Some(l) = unix {
                tasks.push(tokio::spawn(accept_loop(l, serve(Via::UnixSocket))));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
        Ok(ApiServer {
            service: Some(service),
            socket,
        })
    }

    /// Stops serving and waits for in-flight requests.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.service.take() {
            s.stop();
        }
        if let Some(p) = self.socket.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A listener the API serves: TCP or the Unix socket.
trait Listener: Send + 'static {
    /// Its connections.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn next(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// What one listener's accept loop is given.
struct Serving {
    app: Router,
    via: Via,
    limits: ConnLimits,
    stats: Arc<ApiConnStats>,
    stopped: watch::Receiver<bool>,
}

/// Resolves once a stop is requested (the watch's guard is not held across awaits).
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Accepts connections until a stop is requested, serving each on a task of its own
/// within the listener's connection cap; in-flight requests finish before it returns.
async fn accept_loop<L: Listener>(listener: L, serving: Serving) {
    let Serving {
        app,
        via,
        limits,
        stats,
        mut stopped,
    } = serving;
    let slots = Arc::new(Slots {
        cap: limits.max_connections,
        inner: Mutex::new(SlotsInner::default()),
        stats,
    });
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.next() => r,
            () = stop_requested(&mut stopped) => break,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning on the error.
                debug!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        slots.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Some((id, evict)) = slots.admit() else {
            slots.stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let (app, conn_slots, mut stop) = (app.clone(), Arc::clone(&slots), stopped.clone());
        conns.spawn(async move {
            let hyper_svc = TowerToHyperService::new(app);
            let (marks, conn_evict) = (Arc::clone(&conn_slots), Arc::clone(&evict));
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                marks.busy(id);
                req.extensions_mut().insert(via);
                let answer = hyper::service::Service::call(&hyper_svc, req);
                let (marks, evict) = (Arc::clone(&marks), Arc::clone(&conn_evict));
                async move {
                    let r = answer.await;
                    // Between requests a kept-alive connection is idle like a new one, so
                    // a client that was answered (even 401) cannot hold its slot for good.
                    marks.rest(id, &evict);
                    r
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(error = %e, "API connection ended with an error");
                    }
                }
                () = stop_requested(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                // Evicted before it sent a request: dropping the connection closes it.
                _ = evict.notified() => {}
            }
            conn_slots.close(id);
        });
        // Reap finished connections so the set does not grow with every one ever served.
        while conns.try_join_next().is_some() {}
    }
    while conns.join_next().await.is_some() {}
}
