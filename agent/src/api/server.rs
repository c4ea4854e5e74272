//! Serving the router on TCP and, optionally, a Unix socket, on a runtime of its own thread.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info};

use super::routes::{ApiState, router};
use crate::config::ApiConfig;

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
}

/// A running API server; stops when dropped or on `stop`.
pub struct ApiServer {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl ApiServer {
    /// Binds the configured listeners and serves until stopped.
    pub fn start(cfg: &ApiConfig, state: ApiState, token: String) -> Result<Self, ApiStartError> {
        let app = router(state, Arc::new(token));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("api")
            .enable_all()
            .build()
            .map_err(|source| ApiStartError::Bind {
                what: "a tokio runtime".into(),
                source,
            })?;
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
                // A socket file left by a crash would make bind fail.
                let _ = std::fs::remove_file(p);
                let l = rt
                    .block_on(async { tokio::net::UnixListener::bind(p) })
                    .map_err(|source| ApiStartError::Bind {
                        what: p.display().to_string(),
                        source,
                    })?;
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
                info!(socket = %p.display(), "HTTP API listening on a Unix socket");
                Some(l)
            }
        };
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    if let Some(l) = tcp {
                        let mut s = stopped.clone();
                        let app = app.clone();
                        tasks.push(tokio::spawn(async move {
                            axum::serve(l, app)
                                .with_graceful_shutdown(async move {
                                    let _ = s.wait_for(|v| *v).await;
                                })
                                .await
                        }));
                    }
                    if let Some(l) = unix {
                        let mut s = stopped.clone();
                        tasks.push(tokio::spawn(async move {
                            axum::serve(l, app)
                                .with_graceful_shutdown(async move {
                                    let _ = s.wait_for(|v| *v).await;
                                })
                                .await
                        }));
                    }
                    for t in tasks {
                        match t.await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => error!(error = %e, "HTTP API server failed"),
                            Err(e) => error!(error = %e, "HTTP API task failed"),
                        }
                    }
                });
            })
            .map_err(|source| ApiStartError::Bind {
                what: "the api thread".into(),
                source,
            })?;
        Ok(ApiServer {
            stop,
            thread: Some(thread),
            socket,
        })
    }

    /// Stops serving and waits for in-flight requests.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
