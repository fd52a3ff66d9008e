//! The consumer runner: a durable JetStream pull consumer whose messages go through the [`Inbox`]
//! (dedup record and handler writes in one transaction); a message is acknowledged only after that
//! transaction committed.
//!
//! Database trouble is not the message's fault: the runner keeps the message, tells the server it
//! is still working on it (`+WPI`, so it is not redelivered meanwhile) and tries again with backoff
//! for as long as the database is away; it never counts against the message. The handler's own
//! errors are retried by a nak with a delay; the delivery that fails for the `max_deliver`-th time
//! is published to the dead-letter subject and terminated (`+TERM`). A message without usable
//! outbox headers is dead-lettered at once.

mod config;
mod delivery;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use futures::StreamExt;
use outbox_inbox::{Backend, CleanupSchedule, Handler, Inbox, RunnerCore};

use crate::config::connect;
use crate::NatsError;

pub use config::NatsConsumerConfig;

pub use outbox_inbox::dead_letter::HEADER_ERROR;

/// Header with the subject a dead-lettered message came from.
pub const HEADER_ORIGINAL_SUBJECT: &str = "outbox-original-subject";
/// Header with the stream a dead-lettered message came from.
pub const HEADER_ORIGINAL_STREAM: &str = "outbox-original-stream";
/// Header with the stream sequence of a dead-lettered message.
pub const HEADER_ORIGINAL_SEQUENCE: &str = "outbox-original-sequence";
/// Header with how many times the message was delivered.
pub const HEADER_DELIVERIES: &str = "outbox-deliveries";

/// Running counts of what the runner did, readable while it runs (the one set every runner keeps).
pub use outbox_inbox::RunnerStats as NatsConsumerStats;

/// Consumes a stream through a durable pull consumer, processing each message through the inbox.
pub struct NatsConsumerRunner<DB: Backend, H> {
    client: async_nats::Client,
    js: jetstream::Context,
    consumer: PullConsumer,
    /// The pool, inbox, handler and counters, and the try of a message every runner shares.
    core: RunnerCore<DB, H>,
    cfg: NatsConsumerConfig,
    backoff: outbox::Backoff,
}

impl<DB: Backend, H: Handler<DB>> NatsConsumerRunner<DB, H> {
    /// Connects, creates the durable consumer (explicit acks, from the start of the stream) unless
    /// it exists, and the dead-letter stream if so configured. The stream must exist.
    pub async fn connect(
        cfg: NatsConsumerConfig,
        pool: sqlx::Pool<DB>,
        inbox: Inbox,
        handler: H,
    ) -> Result<Self, NatsError> {
        if cfg.stream.is_empty() || cfg.durable.is_empty() {
            return Err(NatsError::Config(
                "the consumer needs a stream and a durable name".into(),
            ));
        }
        let backoff =
            outbox::Backoff::new(cfg.backoff_base, cfg.backoff_max).map_err(|e| NatsError::Config(e.to_string()))?;
        let client = connect(
            &cfg.url,
            &cfg.connection_name,
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
        .await?;
        let js = jetstream::new(client.clone());
        let mut stream = js
            .get_stream(&cfg.stream)
            .await
            .map_err(|e| NatsError::jetstream(&format!("stream {}", cfg.stream), e))?;
        let consumer = stream
            .get_or_create_consumer(
                &cfg.durable,
                pull::Config {
                    durable_name: Some(cfg.durable.clone()),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait.max(Duration::from_millis(1)),
                    // Unlimited: the runner dead-letters, the server never drops silently.
                    max_deliver: -1,
                    max_ack_pending: cfg.max_ack_pending,
                    filter_subject: cfg.filter_subject.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| NatsError::jetstream(&format!("consumer {} of {}", cfg.durable, cfg.stream), e))?;
        check_existing(&consumer.cached_info().config, &cfg)?;
        if cfg.create_dead_letter_stream {
            let subjects = stream
                .info()
                .await
                .map_err(|e| NatsError::jetstream(&format!("stream {}", cfg.stream), e))?
                .config
                .subjects
                .iter()
                .map(|s| format!("{}.{s}", cfg.dead_letter_prefix))
                .collect::<Vec<_>>();
            let name = format!("{}_DLQ", cfg.stream);
            let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
            if let Err(e) = crate::ensure_stream(&client, &name, &subjects).await {
                // A stream of the user's may already take these subjects: dead letters go there.
                tracing::warn!(error = %e, stream = %name, "dead-letter stream not created");
            }
        }
        Ok(NatsConsumerRunner {
            client,
            js,
            consumer,
            core: RunnerCore::new(pool, inbox, handler),
            cfg,
            backoff,
        })
    }

    /// Live counters of this runner.
    pub fn stats(&self) -> Arc<NatsConsumerStats> {
        self.core.stats().clone()
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Consumes until `shutdown` completes: the message being processed finishes (or, while it
    /// waits for the database, is handed back with a nak), then the runner returns. Messages
    /// fetched but not processed are not acknowledged: the server delivers them again after
    /// `ack_wait`. Returns an error only when the durable consumer is deleted under it.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), NatsError> {
        tokio::pin!(shutdown);
        let mut cleanup = CleanupSchedule::new(self.cfg.cleanup_interval);
        let mut messages = None;
        loop {
            if messages.is_none() {
                match self
                    .consumer
                    .stream()
                    .heartbeat(Duration::from_secs(5))
                    .messages()
                    .await
                {
                    Ok(m) => messages = Some(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pull from the consumer; trying again");
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(self.cfg.backoff_max.min(Duration::from_secs(1))) => continue,
                        }
                    }
                }
            }
            let stream = messages.as_mut().expect("set above");
            let next = tokio::select! {
                _ = &mut shutdown => break,
                _ = cleanup.due() => {
                    self.core.clean_up(&mut cleanup).await;
                    continue;
                }
                m = stream.next() => m,
            };
            match next {
                Some(Ok(msg)) => {
                    if self.handle(&msg, &mut shutdown).await {
                        break;
                    }
                }
                Some(Err(e)) if e.kind() == pull::MessagesErrorKind::ConsumerDeleted => {
                    // Someone deleted the durable consumer: its position is gone, and creating it
                    // again would start over from the beginning. An operator decides.
                    return Err(NatsError::jetstream(
                        &format!("consumer {} of {}", self.cfg.durable, self.cfg.stream),
                        "deleted while the runner was consuming",
                    ));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull consumer error");
                    if e.kind() == pull::MessagesErrorKind::NoResponders {
                        messages = None;
                    }
                }
                None => messages = None,
            }
        }
        Ok(())
    }
}

/// Refuses a durable that existed before with settings the runner cannot keep its promises under:
/// with `AckPolicy::All` acking one message acks those before it (some still waiting for their
/// retry); with a server `max_deliver` below the runner's, the server stops delivering a failing
/// message before the runner dead-letters it. Both would lose messages.
fn check_existing(existing: &jetstream::consumer::Config, cfg: &NatsConsumerConfig) -> Result<(), NatsError> {
    let durable = format!("consumer {} of {}", cfg.durable, cfg.stream);
    if existing.ack_policy != AckPolicy::Explicit {
        return Err(NatsError::Config(format!(
            "{durable} exists with ack policy {:?}: the runner acks each message after its commit and needs \
             AckPolicy::Explicit (delete the consumer, the runner creates it)",
            existing.ack_policy
        )));
    }
    if existing.max_deliver > 0 && existing.max_deliver < cfg.max_deliver {
        return Err(NatsError::Config(format!(
            "{durable} exists with max_deliver {} below the runner's max_deliver {}: the server would stop \
             delivering a failing message before the runner dead-letters it",
            existing.max_deliver, cfg.max_deliver
        )));
    }
    Ok(())
}
