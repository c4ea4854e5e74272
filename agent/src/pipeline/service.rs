//! Long-running tasks on the agent's one tokio runtime (the API, the Docker source, the
//! trigger dispatcher), stopped and waited for from the daemon's plain thread.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::watch;

/// A task on the runtime, told to stop through a watch channel.
#[derive(Debug)]
pub struct Service {
    stop: watch::Sender<bool>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Service {
    /// Spawns `body` on `rt`; it gets the receiver that turns true when it should stop.
    pub fn spawn<F, Fut>(rt: &Handle, body: F) -> Service
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        // Dropped when the task ends, however it ends (returned, panicked, or the runtime
        // shut down), which is what `stop` waits for.
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let fut = body(stopped);
        rt.spawn(async move {
            let _done = done_tx;
            fut.await;
        });
        Service { stop, done }
    }

    /// Tells the task to stop and waits until it has. Call from a thread that is not one of
    /// the runtime's workers (the daemon's, or `spawn_blocking`).
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.done.recv();
    }
}
