//! A relay (or what runs in its place) on a task of its own until the figure stops it.

use std::future::Future;

use outbox::{Publisher, Store};
use outbox_relay::Relay;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A task that runs until [`UntilStopped::stop`], which returns its error if it failed.
pub(crate) struct UntilStopped {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl UntilStopped {
    /// Runs the future `run` makes of a receiver that resolves when the task is to stop.
    pub(crate) fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        UntilStopped {
            stop,
            task: tokio::spawn(run(stopped)),
        }
    }

    /// Runs `relay` until stopped.
    pub(crate) fn relay<S: Store + 'static, P: Publisher + 'static>(relay: Relay<S, P>) -> Self {
        Self::spawn(|stopped| async move {
            relay
                .run_until(async {
                    let _ = stopped.await;
                })
                .await?;
            Ok(())
        })
    }

    /// Stops the task and waits for it to end.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}
