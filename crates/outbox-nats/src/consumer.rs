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

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use outbox_inbox::{Backend, Disposition, Handler, Inbox, RunnerCore, Tried};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{connect, redact_url};
use crate::subject::topic_of;
use crate::NatsError;

/// Header naming why a message was dead-lettered.
pub const HEADER_ERROR: &str = "outbox-error";
/// Header with the subject a dead-lettered message came from.
pub const HEADER_ORIGINAL_SUBJECT: &str = "outbox-original-subject";
/// Header with the stream a dead-lettered message came from.
pub const HEADER_ORIGINAL_STREAM: &str = "outbox-original-stream";
/// Header with the stream sequence of a dead-lettered message.
pub const HEADER_ORIGINAL_SEQUENCE: &str = "outbox-original-sequence";
/// Header with how many times the message was delivered.
pub const HEADER_DELIVERIES: &str = "outbox-deliveries";

/// Consumer runner settings. Parsed from a file with serde (`deny_unknown_fields`); every field but
/// `stream` and `durable` has a default.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct NatsConsumerConfig {
    /// Server URLs, as [`NatsConfig::url`](crate::NatsConfig::url) (credentials never logged).
    /// Defaults to `nats://127.0.0.1:4222`.
    pub url: String,
    /// The stream to consume. Required.
    pub stream: String,
    /// The durable consumer's name: members that share it share the work. Required.
    pub durable: String,
    /// Only subjects matching this filter (e.g. `chat.room-1.*`); empty for the whole stream.
    /// Defaults to empty.
    pub filter_subject: String,
    /// The delivery whose handler fails for the `max_deliver`-th time is dead-lettered. Counted
    /// by the server: deliveries after a runner stopped or died before its ack count too. The
    /// consumer itself is created with an unlimited `max_deliver`, so the server never drops a
    /// message without a dead letter. Defaults to 5.
    pub max_deliver: i64,
    /// How long the server waits for an ack before it delivers the message again (to this or
    /// another member). Defaults to 30 000 ms.
    pub ack_wait_ms: u64,
    /// Messages delivered and not yet acknowledged, per consumer (all members together). 1 keeps
    /// every subject, so every key, in stream order even when a message is retried: nothing is
    /// delivered until it is acknowledged or dead-lettered. More lets a later message pass one
    /// that waits for its retry; then keep per-key order with the inbox's `GapPolicy::Hold`
    /// (a successor is parked until its predecessor is applied) or with one consumer per key
    /// subject (`filter_subject`). Defaults to 1.
    pub max_ack_pending: i64,
    /// First retry delay of a failed handler; doubles per delivery, jittered ([`outbox::Backoff`]).
    /// Defaults to 100 ms.
    pub backoff_base_ms: u64,
    /// Retry delay cap (also of the wait for the database). Defaults to 5 000 ms.
    pub backoff_max_ms: u64,
    /// A dead-lettered message from subject `S` is published to `<dead_letter_prefix>.S`.
    /// Defaults to `"dlq"`.
    pub dead_letter_prefix: String,
    /// Create the stream `<stream>_DLQ` taking `<dead_letter_prefix>.<subject>` for each of the
    /// consumed stream's subjects, if it does not exist. Without any stream for the dead-letter
    /// subject, a message to dead-letter waits (and is retried) instead of being dropped.
    /// Defaults to true.
    pub create_dead_letter_stream: bool,
    /// How often the runner deletes the inbox's expired records ([`Inbox::cleanup`]); 0 leaves it
    /// to the application. Defaults to 600 000 ms (10 minutes).
    pub cleanup_interval_ms: u64,
    /// The connection name the server shows. Defaults to `"outbox-consumer"`.
    pub connection_name: String,
}

impl Default for NatsConsumerConfig {
    fn default() -> Self {
        NatsConsumerConfig {
            url: crate::config::DEFAULT_URL.to_owned(),
            stream: String::new(),
            durable: String::new(),
            filter_subject: String::new(),
            max_deliver: 5,
            ack_wait_ms: 30_000,
            max_ack_pending: 1,
            backoff_base_ms: 100,
            backoff_max_ms: 5_000,
            dead_letter_prefix: "dlq".to_owned(),
            create_dead_letter_stream: true,
            cleanup_interval_ms: 600_000,
            connection_name: "outbox-consumer".to_owned(),
        }
    }
}

impl std::fmt::Debug for NatsConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumerConfig")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("filter_subject", &self.filter_subject)
            .field("max_deliver", &self.max_deliver)
            .field("ack_wait_ms", &self.ack_wait_ms)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("backoff_base_ms", &self.backoff_base_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("dead_letter_prefix", &self.dead_letter_prefix)
            .field("create_dead_letter_stream", &self.create_dead_letter_stream)
            .field("cleanup_interval_ms", &self.cleanup_interval_ms)
            .finish()
    }
}

impl NatsConsumerConfig {
    /// Settings for durable consumer `durable` of `stream`, the rest defaults.
    pub fn new(stream: impl Into<String>, durable: impl Into<String>) -> Self {
        NatsConsumerConfig {
            stream: stream.into(),
            durable: durable.into(),
            ..Default::default()
        }
    }
    /// Sets [`NatsConsumerConfig::url`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`NatsConsumerConfig::filter_subject`].
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = filter.into();
        self
    }
    /// Sets [`NatsConsumerConfig::max_deliver`].
    pub fn max_deliver(mut self, n: i64) -> Self {
        self.max_deliver = n.max(1);
        self
    }
    /// Sets [`NatsConsumerConfig::ack_wait_ms`].
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait_ms = d.as_millis() as u64;
        self
    }
    /// Sets [`NatsConsumerConfig::max_ack_pending`].
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = n;
        self
    }
    /// Sets [`NatsConsumerConfig::backoff_base_ms`].
    pub fn backoff_base(mut self, d: Duration) -> Self {
        self.backoff_base_ms = d.as_millis() as u64;
        self
    }
    /// Sets [`NatsConsumerConfig::backoff_max_ms`].
    pub fn backoff_max(mut self, d: Duration) -> Self {
        self.backoff_max_ms = d.as_millis() as u64;
        self
    }
    /// Sets [`NatsConsumerConfig::dead_letter_prefix`].
    pub fn dead_letter_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dead_letter_prefix = prefix.into();
        self
    }
    /// Sets [`NatsConsumerConfig::cleanup_interval_ms`] (`None`: never).
    pub fn cleanup_interval(mut self, every: Option<Duration>) -> Self {
        self.cleanup_interval_ms = every.map_or(0, |d| d.as_millis() as u64);
        self
    }
}

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
        let backoff = outbox::Backoff::new(
            Duration::from_millis(cfg.backoff_base_ms),
            Duration::from_millis(cfg.backoff_max_ms),
        )
        .map_err(|e| NatsError::Config(e.to_string()))?;
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
                    ack_wait: Duration::from_millis(cfg.ack_wait_ms.max(1)),
                    // Unlimited: the runner dead-letters, the server never drops silently.
                    max_deliver: -1,
                    max_ack_pending: cfg.max_ack_pending,
                    filter_subject: cfg.filter_subject.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| NatsError::jetstream(&format!("consumer {} of {}", cfg.durable, cfg.stream), e))?;
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
        let cleanup_every =
            (self.cfg.cleanup_interval_ms > 0).then(|| Duration::from_millis(self.cfg.cleanup_interval_ms));
        let mut next_cleanup = cleanup_every.map(|every| Instant::now() + every);
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
                            _ = tokio::time::sleep(Duration::from_millis(self.cfg.backoff_max_ms.min(1000))) => continue,
                        }
                    }
                }
            }
            let stream = messages.as_mut().expect("set above");
            let next = tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(next_cleanup.unwrap_or_else(Instant::now)), if next_cleanup.is_some() => {
                    match self.core.inbox().cleanup(self.core.pool(), 1000).await {
                        Ok(n) => tracing::debug!(deleted = n, "inbox cleanup"),
                        Err(e) => tracing::warn!(error = %e, "inbox cleanup failed; will try again"),
                    }
                    next_cleanup = cleanup_every.map(|every| Instant::now() + every);
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

    /// Processes one delivery to its end: acked, nak'd for a retry, or dead-lettered. Returns true
    /// when shutdown came while it waited (the message was handed back).
    async fn handle(&self, msg: &jetstream::Message, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
        let (stream_seq, delivered) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.delivered),
            Err(e) => {
                tracing::warn!(error = %e, "not a JetStream delivery; ignored");
                return false;
            }
        };
        let headers: Vec<(&str, &[u8])> = msg
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .flat_map(|(k, vs)| vs.iter().map(move |v| (AsRef::<str>::as_ref(k), v.as_str().as_bytes())))
            .collect();
        let subject = msg.subject.as_str();
        let failed_before = u32::try_from(delivered.max(1) - 1).unwrap_or(u32::MAX);
        let max = u32::try_from(self.cfg.max_deliver).unwrap_or(u32::MAX);
        let mut outage = 0u32;
        loop {
            let tried = self
                .core
                .try_once(topic_of(subject), &msg.payload, headers.iter().copied(), failed_before, max, |incoming, _| {
                    tracing::info_span!("inbox.process", outbox.id = %incoming.id, subject, stream_seq, delivered)
                })
                .await;
            let (id, disposition, error) = match tried {
                Tried::Unreadable { error } => {
                    return self
                        .dead_letter_until_done(msg, &error, delivered, stream_seq, shutdown)
                        .await
                }
                Tried::Decided { id, disposition, error } => (id, disposition, error),
            };
            match disposition {
                Disposition::Done => {
                    // Committed: now the ack. A lost ack means one more delivery, which the inbox
                    // recognises.
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(outbox.id = %id, error = %e, "ack not sent; the message will be delivered again");
                    }
                    return false;
                }
                Disposition::WaitForDatabase => {
                    // The database, not the message: keep it and wait, however long it takes.
                    outage += 1;
                    if self.wait_holding(msg, self.backoff.delay(outage), shutdown).await {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return true;
                    }
                }
                Disposition::Retry { attempt } => {
                    let delay = self.backoff.delay(attempt);
                    tracing::debug!(outbox.id = %id, delivered, ?delay, "delivered again after the delay");
                    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                        tracing::warn!(error = %e, "nak not sent; the message comes back after ack_wait");
                    }
                    return false;
                }
                Disposition::DeadLetter { .. } => {
                    return self
                        .dead_letter_until_done(msg, &error, delivered, stream_seq, shutdown)
                        .await;
                }
            }
        }
    }

    /// Waits `delay` while telling the server the message is still being worked on. True when
    /// shutdown came first.
    async fn wait_holding(
        &self,
        msg: &jetstream::Message,
        delay: Duration,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let until = Instant::now() + delay;
        let beat = Duration::from_millis((self.cfg.ack_wait_ms / 3).max(1));
        loop {
            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "progress not sent");
            }
            let wake = (Instant::now() + beat).min(until);
            tokio::select! {
                _ = &mut *shutdown => return true,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= until {
                return false;
            }
        }
    }

    /// Publishes the message to its dead-letter subject and terminates it; while that subject
    /// cannot be written, the message waits (held) and it is tried again.
    async fn dead_letter_until_done(
        &self,
        msg: &jetstream::Message,
        error: &str,
        delivered: i64,
        stream_seq: u64,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let mut tries = 0u32;
        loop {
            match self.dead_letter(msg, error, delivered, stream_seq).await {
                Ok(()) => {
                    if let Err(e) = msg.ack_with(AckKind::Term).await {
                        tracing::warn!(error = %e, "term not sent; the message comes back and is dead-lettered again (the dead-letter stream drops the copy)");
                    }
                    return false;
                }
                Err(e) => {
                    self.core.stats().infrastructure_retries.fetch_add(1, Relaxed);
                    tries += 1;
                    tracing::error!(error = %e, "dead letter not written; the message waits and is retried");
                    if self.wait_holding(msg, self.backoff.delay(tries), shutdown).await {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return true;
                    }
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        error: &str,
        delivered: i64,
        stream_seq: u64,
    ) -> Result<(), String> {
        let subject = format!("{}.{}", self.cfg.dead_letter_prefix, msg.subject);
        let mut headers = msg.headers.clone().unwrap_or_default();
        // One line: a header value cannot hold a line break.
        let error = error.replace(['\r', '\n'], " ");
        for (k, v) in [
            (HEADER_ERROR, error.as_str()),
            (HEADER_ORIGINAL_SUBJECT, msg.subject.as_str()),
            (HEADER_ORIGINAL_STREAM, self.cfg.stream.as_str()),
            (HEADER_ORIGINAL_SEQUENCE, &stream_seq.to_string()),
            (HEADER_DELIVERIES, &delivered.to_string()),
        ] {
            if let (Ok(k), Ok(v)) = (HeaderName::from_str(k), HeaderValue::from_str(v)) {
                headers.insert(k, v);
            }
        }
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, msg.payload.clone())
            .await
            .map_err(|e| format!("{subject}: {e}"))?;
        ack.await.map_err(|e| format!("{subject}: {e}"))?;
        self.core.dead_lettered();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones_and_files_refuse_unknown_keys() {
        let cfg: NatsConsumerConfig = toml::from_str("stream = 'ORDERS'\ndurable = 'billing'").unwrap();
        assert_eq!((cfg.stream.as_str(), cfg.durable.as_str()), ("ORDERS", "billing"));
        assert_eq!(cfg.url, "nats://127.0.0.1:4222");
        assert_eq!(cfg.max_deliver, 5);
        assert_eq!(cfg.ack_wait_ms, 30_000);
        assert_eq!(cfg.max_ack_pending, 1);
        assert_eq!((cfg.backoff_base_ms, cfg.backoff_max_ms), (100, 5_000));
        assert_eq!(cfg.dead_letter_prefix, "dlq");
        assert!(cfg.create_dead_letter_stream);
        assert_eq!(cfg.cleanup_interval_ms, 600_000);
        let err = toml::from_str::<NatsConsumerConfig>("max_delivery = 3").err().unwrap();
        assert!(err.to_string().contains("max_delivery"), "{err}");
        let shown = format!("{:?}", cfg.url("nats://u:hunter2@h"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
