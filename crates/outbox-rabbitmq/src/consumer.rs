//! The consumer runner: reads one queue with manual acks, runs each delivery through the
//! [`Inbox`] (dedup record and handler writes in one transaction), and acks only after that commit.
//!
//! Deliveries are applied one at a time in queue order. A delivery that cannot be applied now is
//! retried in place (the deliveries behind it wait, so a key never overtakes itself): handler
//! errors with backoff up to `max_attempts`, then the delivery goes to the dead-letter exchange
//! and is acked; database trouble for as long as it lasts, never dead-lettered. A lost connection
//! is opened again; what was delivered and not acked comes back from the server (the inbox
//! recognises what was already applied).

mod config;
mod delivery;
mod session;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use outbox_inbox::{Backend, CleanupSchedule, Handler, Inbox, RetryInPlace, RunnerCore, Step};

use crate::config::check_url;
pub use config::RabbitConsumerConfig;
use outbox::redact::redact_url;
use session::{Fatal, Session};

pub use outbox_inbox::dead_letter::{HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ORIGINAL_TOPIC};

/// Header with the exchange a dead-lettered message was published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "outbox-original-exchange";
/// Header with the queue a dead-lettered message was consumed from.
pub const HEADER_ORIGINAL_QUEUE: &str = "outbox-original-queue";

/// Running counts of what the runner did, readable while it runs (the one set every runner keeps;
/// `reconnects` counts this runner's own reconnections).
pub use outbox_inbox::RunnerStats as ConsumerStats;

/// Errors that stop the runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The settings cannot work (e.g. no queue).
    #[error("invalid consumer settings: {0}")]
    Config(String),
    /// The server could not be reached (only [`RabbitConsumerRunner::declare`] returns it;
    /// `run_until` keeps trying). Names the server without its password.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The server refused to declare or bind the queue, or to consume it (e.g. it exists with
    /// other arguments, or access is refused): no retry can fix it.
    #[error("cannot set up queue {queue}: {source}")]
    Setup {
        /// The queue.
        queue: String,
        /// What the server said.
        source: lapin::Error,
    },
}

/// Consumes one queue, processing each delivery through the inbox and acking it after the commit.
pub struct RabbitConsumerRunner<DB: Backend, H> {
    cfg: RabbitConsumerConfig,
    /// The pool, inbox, handler and counters, and the try of a delivery every runner shares.
    core: RunnerCore<DB, H>,
}

/// Why a connection's consuming ended.
enum End {
    Shutdown,
    Lost(String),
}

impl<DB: Backend, H: Handler<DB>> RabbitConsumerRunner<DB, H> {
    /// A runner for `cfg.queue`; it connects when run.
    pub fn new(
        cfg: RabbitConsumerConfig,
        pool: sqlx::Pool<DB>,
        inbox: Inbox,
        handler: H,
    ) -> Result<Self, ConsumerError> {
        if cfg.queue.is_empty() {
            return Err(ConsumerError::Config("queue is empty".into()));
        }
        check_url(&cfg.url).map_err(ConsumerError::Config)?;
        Ok(RabbitConsumerRunner {
            cfg,
            core: RunnerCore::new(pool, inbox, handler),
        })
    }

    /// Live counters of this runner.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.core.stats().clone()
    }

    /// Connects once and declares what [`RabbitConsumerConfig::declare`] asks for (the queue, its
    /// bindings, the dead-letter queue), then disconnects. Call it before anything is published
    /// to the queue: a message published before its queue exists is unroutable (the relay
    /// dead-letters it). `run_until` declares the same again, so calling this is optional.
    pub async fn declare(&self) -> Result<(), ConsumerError> {
        let session = match self.open(false).await {
            Ok(s) => s,
            Err(Fatal::Setup(e)) => return Err(e),
            Err(Fatal::Retry(why)) => return Err(ConsumerError::Connect(why)),
        };
        let _ = session.conn.close(200, "declared").await;
        Ok(())
    }

    /// Consumes until `shutdown` completes: the delivery being processed finishes and is acked,
    /// then the channel is closed (the server requeues what was prefetched and not acked, in
    /// order) and the runner returns. A delivery waiting for a retry does not hold shutdown up.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        let backoff = self
            .cfg
            .retry_backoff()
            .map_err(|e| ConsumerError::Config(e.to_string()))?;
        // Database trouble holds the queue for as long as it lasts; so does a dead letter that
        // cannot be written.
        let retry = RetryInPlace::new(backoff, "the queue");
        tokio::pin!(shutdown);
        let mut cleanup = CleanupSchedule::new(self.cfg.cleanup_interval);
        let mut first = true;
        loop {
            let session = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                s = self.open(true) => s,
            };
            let session = match session {
                Ok(s) => s,
                Err(Fatal::Setup(e)) => return Err(e),
                Err(Fatal::Retry(why)) => {
                    tracing::warn!(url = %redact_url(&self.cfg.url), error = %why, "cannot consume; connecting again");
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(self.cfg.backoff_max) => continue,
                    }
                }
            };
            if !first {
                self.core.stats().reconnects.fetch_add(1, Relaxed);
            }
            first = false;
            let end = self.consume(&session, &retry, &mut shutdown, &mut cleanup).await;
            let _ = session.consume.close(200, "bye").await;
            let _ = session.conn.close(200, "bye").await;
            match end {
                End::Shutdown => return Ok(()),
                End::Lost(why) => {
                    tracing::warn!(error = %why, "connection to RabbitMQ lost; unacked deliveries come back");
                }
            }
        }
    }

    async fn consume(
        &self,
        session: &Session,
        retry: &RetryInPlace,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        cleanup: &mut CleanupSchedule,
    ) -> End {
        let Some(mut consumer) = session.consumer.clone() else {
            return End::Lost("not consuming".into());
        };
        loop {
            let delivery = tokio::select! {
                _ = &mut *shutdown => return End::Shutdown,
                _ = cleanup.due() => {
                    self.core.clean_up(cleanup).await;
                    continue;
                }
                d = consumer.next() => d,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => return End::Lost(e.to_string()),
                None => return End::Lost("the server cancelled the consumer".into()),
            };
            let mut attempts = 0;
            loop {
                match self.attempt(&session.dead, &delivery, attempts, retry).await {
                    Step::Done => break,
                    Step::Again { attempts: a, delay } => {
                        attempts = a;
                        tokio::select! {
                            _ = &mut *shutdown => return End::Shutdown,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        if !session.dead.status().connected() {
                            // The server closed the dead-letter channel (its exchange is missing,
                            // say): a closed channel never recovers, a new session opens a new one,
                            // after the delay (a new session finds the exchange missing as fast).
                            return End::Lost("the server closed the dead-letter channel".into());
                        }
                    }
                }
            }
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                // Committed but not acked: the server delivers it again, the inbox recognises it.
                return End::Lost(format!("ack failed: {e}"));
            }
        }
    }
}
