//! The consumer runner: reads a topic, runs each message through the [`Inbox`] (dedup record and
//! handler writes in one transaction), and only then stores its offset for commit.
//!
//! A message that cannot be applied now never blocks the other partitions: its partition is
//! paused and rewound to it, and resumed after a backoff, while the runner keeps polling (so it
//! stays in its group and shutdown is never blocked). Database trouble (connection refused,
//! read-only server, too many connections, disk full...) is not the message's fault: it is
//! retried for as long as it lasts and never dead-lettered. The handler's own errors are retried
//! with backoff; after `max_attempts` the message goes to a dead-letter topic and the partition
//! moves on. A message without usable outbox headers is dead-lettered at once.

mod config;
mod waiting;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use outbox::InvalidBackoff;
use outbox_inbox::{Backend, CleanupSchedule, Handler, Inbox, Parked, RetryInPlace, RunnerCore, Step};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::time::Instant;

pub use config::ConsumerConfig;
use waiting::{ReadPast, Rebalances, RunnerConsumer, Waiting};

pub use outbox_inbox::dead_letter::{HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ORIGINAL_TOPIC};

/// Header with the partition a dead-lettered message came from.
pub const HEADER_ORIGINAL_PARTITION: &str = "outbox-original-partition";
/// Header with the offset a dead-lettered message came from.
pub const HEADER_ORIGINAL_OFFSET: &str = "outbox-original-offset";

/// Running counts of what the runner did, readable while it runs (the one set every runner keeps).
pub use outbox_inbox::RunnerStats as ConsumerStats;

/// How long the runner asks its topics' retention at start before it goes on without the answer.
pub(crate) const RETENTION_CHECK: Duration = Duration::from_secs(5);

/// Errors that stop the runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// Kafka client creation, subscription or commit failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The settings are not usable (a backoff base above its cap).
    #[error(transparent)]
    Config(#[from] InvalidBackoff),
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
    consumer: RunnerConsumer,
    /// The subscribed topics.
    topics: Vec<String>,
    /// Settings for an admin client (connection and security settings of the consumer).
    admin: ClientConfig,
    /// Whether a group without committed offsets starts at the beginning of its topics.
    reset_earliest: bool,
    producer: FutureProducer,
    /// The pool, inbox, handler and counters, and the try of a message every runner shares.
    core: RunnerCore<DB, H>,
    cfg: ConsumerConfig,
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
        let admin = pcfg.clone();
        pcfg.set("acks", "all").set("enable.idempotence", "true");
        let reset_earliest = matches!(
            ccfg.get("auto.offset.reset"),
            Some("earliest" | "smallest" | "beginning")
        );
        let consumer: RunnerConsumer = ccfg.create_with_context(Rebalances::default())?;
        consumer.subscribe(topics)?;
        Ok(ConsumerRunner {
            consumer,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            admin,
            reset_earliest,
            producer: pcfg.create()?,
            core: RunnerCore::new(pool, inbox, handler),
            cfg: ConsumerConfig::default(),
        })
    }

    /// Replaces the settings.
    pub fn config(mut self, cfg: ConsumerConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Live counters of this runner.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.core.stats().clone()
    }

    /// Compares each topic's `retention.ms` with the inbox's retention (asked of the cluster for
    /// at most 5 s by `run_until`). With
    /// `auto.offset.reset=earliest` (the runner's default), a group whose committed offsets expired
    /// (Kafka's `offsets.retention.minutes`) reads its topics again from the start; an unkeyed
    /// message still on a topic but no longer in the inbox would then be applied again. Returns one
    /// line per topic at risk (empty when the inbox keeps unkeyed records at least as long as every
    /// topic keeps messages, or when the group starts at the end); `run_until` logs them.
    pub async fn check_retention(&self) -> Result<Vec<String>, ConsumerError> {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        if !self.reset_earliest {
            return Ok(Vec::new());
        }
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = self.admin.create()?;
        let options = AdminOptions::new().request_timeout(Some(RETENTION_CHECK));
        let specs: Vec<ResourceSpecifier<'_>> = self.topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let inbox_ms = i64::try_from(self.core.inbox().retention_window().as_millis()).unwrap_or(i64::MAX);
        let mut risks = Vec::new();
        for (topic, res) in self.topics.iter().zip(admin.describe_configs(&specs, &options).await?) {
            let Ok(resource) = res else { continue };
            let Some(topic_ms) = resource
                .get("retention.ms")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<i64>().ok())
            else {
                continue;
            };
            if topic_ms < 0 || topic_ms > inbox_ms {
                risks.push(format!(
                    "topic {topic} keeps messages for retention.ms={topic_ms} but the inbox keeps unkeyed \
                     records for {inbox_ms} ms: after the group's committed offsets expire, older unkeyed \
                     messages would be applied again (raise Inbox::retention to at least the topic's \
                     retention, or set auto.offset.reset=latest)"
                ));
            }
        }
        Ok(risks)
    }

    /// Consumes until `shutdown` completes: the message being processed finishes, stored offsets
    /// are committed, then the runner returns. Shutdown is never held up by a message waiting for
    /// a retry: its partition's offset simply stays before it.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        // Database trouble holds a partition for as long as it lasts; so does a dead letter that
        // cannot be written.
        let retry = RetryInPlace::new(self.cfg.retry_backoff()?, "the partition");
        // Bounded: a cluster that does not answer (librdkafka's mock cluster has no
        // DescribeConfigs) held the first message for the admin request's timeout, a minute.
        match tokio::time::timeout(RETENTION_CHECK, self.check_retention()).await {
            Err(_) => tracing::debug!(within = ?RETENTION_CHECK, "topic retention not checked: no answer"),
            Ok(Ok(risks)) => {
                for risk in risks {
                    tracing::warn!("{risk}");
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "topic retention not checked"),
        }
        tokio::pin!(shutdown);
        let mut waiting = Waiting::default();
        let mut cleanup = CleanupSchedule::new(self.cfg.cleanup_interval);
        loop {
            let next_resume = waiting.next_resume();
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                _ = cleanup.due() => {
                    self.core.clean_up(&mut cleanup).await;
                    continue;
                }
                _ = tokio::time::sleep_until(next_resume.unwrap_or_else(Instant::now)), if next_resume.is_some() => {
                    waiting.resume_due(&self.consumer);
                    continue;
                }
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
            };
            // A rebalance runs inside the poll that returned the message.
            waiting.forget_revoked(&self.consumer);
            let tp = (msg.topic().to_owned(), msg.partition());
            if waiting.is_paused(&tp) {
                // Fetched before its partition was paused; read again after the resume.
                continue;
            }
            match waiting.read_past(&tp, msg.offset()) {
                ReadPast::No => {}
                ReadPast::Rewind(at) => {
                    tracing::warn!(
                        topic = tp.0,
                        partition = tp.1,
                        offset = msg.offset(),
                        waiting = at,
                        "read past the message waiting for its retry; reading from it again"
                    );
                    waiting.rewind(&self.consumer, &tp, at);
                    continue;
                }
                ReadPast::Gone(at) => tracing::warn!(
                    topic = tp.0,
                    partition = tp.1,
                    offset = msg.offset(),
                    waiting = at,
                    "the message waiting for its retry is no longer in the log (retention); going on"
                ),
            }
            let attempts = waiting.attempts(&tp, msg.offset());
            match self.attempt(&msg, attempts, &retry).await {
                Step::Done => {
                    waiting.done(&tp);
                    self.store(&msg);
                }
                Step::Again { attempts, delay } => waiting.pause(&self.consumer, tp, msg.offset(), attempts, delay),
            }
        }
        // Commit what is stored; an empty assignment or nothing stored is not an error.
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final offset commit failed; messages may be redelivered"),
        }
        Ok(())
    }

    /// One try at a message: applied (or a duplicate, or dead-lettered) means done; anything else
    /// means try again after a delay. `attempts` counts the handler's earlier failures only. A
    /// message that cannot be dead-lettered waits (its partition is retried later) rather than
    /// being skipped.
    async fn attempt(&self, msg: &OwnedMessage, attempts: u32, retry: &RetryInPlace) -> Step {
        let headers = readable_headers(msg);
        let payload = msg.payload().unwrap_or_default();
        let tried = self
            .core
            .try_once(
                msg.topic(),
                payload,
                headers.iter().copied(),
                attempts,
                self.cfg.max_attempts,
                |incoming, traceparent| {
                    let span = tracing::info_span!("inbox.process", outbox.id = %incoming.id, topic = msg.topic(),
                    partition = msg.partition(), offset = msg.offset(), traceparent);
                    #[cfg(feature = "opentelemetry")]
                    if let Some(parent) = traceparent.and_then(outbox::trace::parent_context) {
                        use tracing_opentelemetry::OpenTelemetrySpanExt;
                        // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
                        let _ = span.set_parent(parent);
                    }
                    span
                },
            )
            .await;
        self.core
            .step(tried, attempts, retry, |error, attempts, parked| async move {
                self.dead_letter(msg, &error, attempts, parked).await
            })
            .await
    }

    /// Stores the offset after `msg` for the next commit. A partition revoked meanwhile refuses it:
    /// its new owner reads the message again (and the inbox recognises it).
    fn store(&self, msg: &OwnedMessage) {
        if let Err(e) = self.consumer.store_offset(msg.topic(), msg.partition(), msg.offset()) {
            tracing::warn!(error = %e, topic = msg.topic(), partition = msg.partition(), "offset not stored (partition revoked?)");
        }
    }

    /// Writes the dead letter of `msg`, or of `parked` (a parked message `msg` brought along that
    /// failed every try; its partition and offset are not known, so they are left out), to the
    /// dead-letter topic.
    async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        error: &str,
        attempts: u32,
        parked: Option<Parked>,
    ) -> Result<(), ConsumerError> {
        let origin = parked.as_ref().map_or(msg.topic(), |p| p.topic.as_str());
        let topic = self
            .cfg
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{origin}.dlq"));
        let attempts = attempts.to_string();
        let (payload, mut headers) = match &parked {
            // A copy of the original headers as they are (names that are not UTF-8 too).
            None => {
                let (partition, offset) = (msg.partition().to_string(), msg.offset().to_string());
                let headers = msg.headers().cloned().unwrap_or_else(OwnedHeaders::new);
                let headers = headers
                    .insert(Header {
                        key: HEADER_ORIGINAL_PARTITION,
                        value: Some(&partition),
                    })
                    .insert(Header {
                        key: HEADER_ORIGINAL_OFFSET,
                        value: Some(&offset),
                    });
                (msg.payload().unwrap_or_default(), headers)
            }
            Some(p) => {
                let headers = p.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                    h.insert(Header { key: k, value: Some(v) })
                });
                (p.payload.as_slice(), headers)
            }
        };
        for (k, v) in [
            (HEADER_ERROR, error),
            (HEADER_ORIGINAL_TOPIC, origin),
            (HEADER_ATTEMPTS, &attempts),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        // The parked message has the delivered one's key.
        let mut record = FutureRecord::to(&topic).payload(payload).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(source, _)| ConsumerError::DeadLetter { topic, source })?;
        Ok(())
    }
}

/// The message's headers whose names are text. rdkafka's reader panics on a name that is not UTF-8
/// (`to_str().unwrap()`), which any producer but rdkafka's and Java's can send: read one by one,
/// such a header is left out (and logged) and the rest are read as usual. (Built with
/// `panic = "abort"`, the process aborts on it instead.)
fn readable_headers(msg: &OwnedMessage) -> Vec<(&str, &[u8])> {
    let Some(h) = msg.headers() else {
        return Vec::new();
    };
    (0..h.count())
        .filter_map(|idx| match std::panic::catch_unwind(|| h.try_get(idx)) {
            Ok(header) => header.map(|h| (h.key, h.value.unwrap_or_default())),
            Err(_) => {
                tracing::warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    index = idx,
                    "a header whose name is not UTF-8 is left out"
                );
                None
            }
        })
        .collect()
}
