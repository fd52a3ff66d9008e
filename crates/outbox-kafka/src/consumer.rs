//! The consumer runner: reads a topic, runs each message through the [`Inbox`] (dedup record and
//! handler writes in one transaction), and only then stores its offset for commit. Handler errors
//! retry with backoff; after `max_attempts` the message goes to a dead-letter topic and the
//! partition moves on.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use outbox_inbox::{Backend, Handler, Inbox, Incoming, Outcome};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::Instrument;

/// Header naming why a message was dead-lettered.
pub const HEADER_ERROR: &str = "outbox-error";
/// Header with the topic a dead-lettered message came from.
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox-original-topic";
/// Header with the partition a dead-lettered message came from.
pub const HEADER_ORIGINAL_PARTITION: &str = "outbox-original-partition";
/// Header with the offset a dead-lettered message came from.
pub const HEADER_ORIGINAL_OFFSET: &str = "outbox-original-offset";
/// Header with how many attempts were made.
pub const HEADER_ATTEMPTS: &str = "outbox-attempts";

/// Consumer runner settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Handler attempts before the message is dead-lettered. Defaults to 5.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt. Defaults to 100 ms.
    pub backoff_base: Duration,
    /// Retry delay cap. Defaults to 5 s.
    pub backoff_max: Duration,
    /// Dead-letter topic; by default `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            dead_letter_topic: None,
        }
    }
}

impl ConsumerConfig {
    /// Sets [`ConsumerConfig::max_attempts`].
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets [`ConsumerConfig::backoff_base`].
    pub fn backoff_base(mut self, d: Duration) -> Self {
        self.backoff_base = d;
        self
    }
    /// Sets [`ConsumerConfig::backoff_max`].
    pub fn backoff_max(mut self, d: Duration) -> Self {
        self.backoff_max = d;
        self
    }
    /// Sets [`ConsumerConfig::dead_letter_topic`].
    pub fn dead_letter_topic(mut self, t: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(t.into());
        self
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.backoff_base
            .saturating_mul(1 << attempt.clamp(1, 16).saturating_sub(1))
            .min(self.backoff_max)
    }
}

/// Running counts of what the runner did, readable while it runs (also exported as metrics).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages whose handler ran and committed.
    pub processed: AtomicU64,
    /// Deliveries recognised as duplicates (the handler did not run).
    pub duplicates: AtomicU64,
    /// Handler attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

/// Errors that stop the runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// Kafka client creation, subscription or commit failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A dead letter could not be written: the runner stops rather than skip the message.
    #[error("could not write to the dead-letter topic {topic}: {source}")]
    DeadLetter {
        /// Dead-letter topic.
        topic: String,
        /// Cause.
        source: KafkaError,
    },
}

/// Consumes `topics` in group `group.id`, processing each message through the inbox.
///
/// Settings pass straight to librdkafka; the runner forces `enable.auto.offset.store=false`
/// (offsets are stored only after processing) and keeps auto-commit of stored offsets on, so
/// librdkafka also commits stored offsets of revoked partitions on a rebalance.
pub struct ConsumerRunner<DB: Backend, H> {
    consumer: StreamConsumer,
    producer: FutureProducer,
    pool: sqlx::Pool<DB>,
    inbox: Inbox,
    handler: H,
    cfg: ConsumerConfig,
    stats: Arc<ConsumerStats>,
}

impl<DB: Backend, H: Handler<DB>> ConsumerRunner<DB, H> {
    /// Creates the consumer (subscribed to `topics`) and the dead-letter producer.
    pub fn new<K: Into<String>, V: Into<String>>(
        settings: impl IntoIterator<Item = (K, V)>,
        topics: &[&str],
        pool: sqlx::Pool<DB>,
        inbox: Inbox,
        handler: H,
    ) -> Result<Self, ConsumerError> {
        let settings: Vec<(String, String)> = settings.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let mut ccfg = ClientConfig::new();
        let mut pcfg = ClientConfig::new();
        ccfg.set("enable.auto.commit", "true")
            .set("auto.offset.reset", "earliest");
        for (k, v) in &settings {
            ccfg.set(k, v);
            if matches!(
                k.split('.').next(),
                Some("bootstrap" | "security" | "ssl" | "sasl" | "client")
            ) {
                pcfg.set(k, v);
            }
        }
        ccfg.set("enable.auto.offset.store", "false");
        pcfg.set("acks", "all").set("enable.idempotence", "true");
        let consumer: StreamConsumer = ccfg.create()?;
        consumer.subscribe(topics)?;
        Ok(ConsumerRunner {
            consumer,
            producer: pcfg.create()?,
            pool,
            inbox,
            handler,
            cfg: ConsumerConfig::default(),
            stats: Arc::default(),
        })
    }

    /// Replaces the settings.
    pub fn config(mut self, cfg: ConsumerConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Live counters of this runner.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Consumes until `shutdown` completes: the message being processed finishes, stored offsets
    /// are committed, then the runner returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
            };
            self.handle(&msg).await?;
        }
        // Commit what is stored; an empty assignment or nothing stored is not an error.
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final offset commit failed; messages may be redelivered"),
        }
        Ok(())
    }

    /// Processes one message until it is done (processed, duplicate) or dead-lettered, then stores
    /// its offset.
    async fn handle(&self, msg: &OwnedMessage) -> Result<(), ConsumerError> {
        let headers: Vec<(&str, &[u8])> = msg
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value.unwrap_or_default())).collect())
            .unwrap_or_default();
        let payload = msg.payload().unwrap_or_default();
        let incoming = match Incoming::from_headers(msg.topic(), payload, headers.iter().copied()) {
            Ok(i) => i,
            Err(e) => {
                self.dead_letter(msg, &e.to_string(), 0).await?;
                return self.store(msg);
            }
        };
        let traceparent = incoming
            .header_value(outbox::HEADER_TRACEPARENT)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let span = tracing::info_span!("inbox.process", outbox.id = %incoming.id, topic = msg.topic(),
            partition = msg.partition(), offset = msg.offset(), traceparent = traceparent.as_deref());
        #[cfg(feature = "opentelemetry")]
        if let Some(parent) = traceparent.as_deref().and_then(outbox::trace::parent_context) {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
            let _ = span.set_parent(parent);
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let res = self
                .inbox
                .process(&self.pool, &incoming, &self.handler)
                .instrument(span.clone())
                .await;
            match res {
                Ok(o @ (Outcome::Processed | Outcome::Duplicate)) => {
                    let counter = if o == Outcome::Processed {
                        &self.stats.processed
                    } else {
                        &self.stats.duplicates
                    };
                    counter.fetch_add(1, Relaxed);
                    return self.store(msg);
                }
                Ok(_held) => {
                    // A gap under GapPolicy::Hold: wait for the missing message; never dead-letter.
                    tracing::info!(outbox.id = %incoming.id, "held: waiting for an earlier message of the key");
                    attempt = attempt.min(self.cfg.max_attempts.saturating_sub(1));
                }
                Err(e) if e.is_retryable() && attempt < self.cfg.max_attempts => {
                    self.stats.retries.fetch_add(1, Relaxed);
                    tracing::warn!(outbox.id = %incoming.id, attempt, error = %e, "handler failed; retrying");
                }
                Err(e) => {
                    tracing::error!(outbox.id = %incoming.id, attempt, error = %e, "giving up; dead-lettering");
                    self.dead_letter(msg, &e.to_string(), attempt).await?;
                    return self.store(msg);
                }
            }
            tokio::time::sleep(self.cfg.backoff(attempt)).await;
        }
    }

    fn store(&self, msg: &OwnedMessage) -> Result<(), ConsumerError> {
        self.consumer.store_offset(msg.topic(), msg.partition(), msg.offset())?;
        Ok(())
    }

    async fn dead_letter(&self, msg: &OwnedMessage, error: &str, attempts: u32) -> Result<(), ConsumerError> {
        let topic = self
            .cfg
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", msg.topic()));
        let (partition, offset, attempts) = (
            msg.partition().to_string(),
            msg.offset().to_string(),
            attempts.to_string(),
        );
        let mut headers = OwnedHeaders::new();
        if let Some(h) = msg.headers() {
            for h in h.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        for (k, v) in [
            (HEADER_ERROR, error),
            (HEADER_ORIGINAL_TOPIC, msg.topic()),
            (HEADER_ORIGINAL_PARTITION, &partition),
            (HEADER_ORIGINAL_OFFSET, &offset),
            (HEADER_ATTEMPTS, &attempts),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&topic)
            .payload(msg.payload().unwrap_or_default())
            .headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        metrics::counter!("outbox_consumer_dead_lettered_total").increment(1);
        self.stats.dead_lettered.fetch_add(1, Relaxed);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(source, _)| ConsumerError::DeadLetter { topic, source })
    }
}
