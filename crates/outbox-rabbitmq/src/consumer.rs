//! The consumer runner: reads one queue with manual acks, runs each delivery through the
//! [`Inbox`] (dedup record and handler writes in one transaction), and acks only after that commit.
//!
//! Deliveries are applied one at a time in queue order. A delivery that cannot be applied now is
//! retried in place (the deliveries behind it wait, so a key never overtakes itself): handler
//! errors with backoff up to `max_attempts`, then the delivery goes to the dead-letter exchange
//! and is acked; database trouble for as long as it lasts, never dead-lettered. A lost connection
//! is opened again; what was delivered and not acked comes back from the server (the inbox
//! recognises what was already applied).

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use outbox_inbox::{Backend, Handler, Inbox, RetryInPlace, RunnerCore, Step};
use tokio::time::Instant;

use crate::config::{connect, redact_url, DEFAULT_URL};

/// Header naming why a message was dead-lettered.
pub const HEADER_ERROR: &str = "outbox-error";
/// Header with the routing key (the outbox topic) a dead-lettered message was published with.
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox-original-topic";
/// Header with the exchange a dead-lettered message was published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "outbox-original-exchange";
/// Header with the queue a dead-lettered message was consumed from.
pub const HEADER_ORIGINAL_QUEUE: &str = "outbox-original-queue";
/// Header with how many handler attempts were made.
pub const HEADER_ATTEMPTS: &str = "outbox-attempts";

/// Consumer runner settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct RabbitConsumerConfig {
    /// AMQP URI; never logged with its password. Defaults to
    /// [`DEFAULT_URL`](crate::DEFAULT_URL).
    pub url: String,
    /// The queue consumed. No default: [`RabbitConsumerConfig::new`] takes it.
    pub queue: String,
    /// When true, the runner declares the queue (durable, `x-single-active-consumer`), binds it
    /// to [`exchange`](Self::exchange) for each of [`bindings`](Self::bindings), and declares the
    /// dead-letter queue when dead letters go to the default exchange. A queue that already exists
    /// with other arguments is an error. Defaults to true.
    pub declare: bool,
    /// Exchange the queue is bound to. Defaults to `""` (the default exchange, which needs no
    /// binding: the queue takes the messages whose topic is its name).
    pub exchange: String,
    /// Routing keys (outbox topics) the queue is bound with. Defaults to none.
    pub bindings: Vec<String>,
    /// Deliveries the server sends ahead of the acks (`basic.qos`). Defaults to 32.
    pub prefetch: u16,
    /// Handler attempts before the message is dead-lettered. Defaults to 5.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter. Defaults to 100 ms.
    pub backoff_base: Duration,
    /// Retry delay cap, also the wait before connecting again. Defaults to 5 s.
    pub backoff_max: Duration,
    /// Exchange dead letters are published to. Defaults to `""` (the default exchange).
    pub dead_letter_exchange: String,
    /// Routing key of dead letters; by default `<queue>.dlq` (with the default exchange: the
    /// dead-letter queue's name).
    pub dead_letter_routing_key: Option<String>,
    /// How often the runner deletes the inbox's expired records ([`Inbox::cleanup`]); `None`
    /// leaves it to the application. Defaults to every 10 minutes.
    pub cleanup_interval: Option<Duration>,
    /// How long opening the connection may take. Defaults to 10 s.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for RabbitConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConsumerConfig")
            .field("url", &redact_url(&self.url))
            .field("queue", &self.queue)
            .field("declare", &self.declare)
            .field("exchange", &self.exchange)
            .field("bindings", &self.bindings)
            .field("prefetch", &self.prefetch)
            .field("max_attempts", &self.max_attempts)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_routing_key", &self.dead_letter_routing_key)
            .finish_non_exhaustive()
    }
}

impl RabbitConsumerConfig {
    /// The defaults for consuming `queue` at `url`.
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        RabbitConsumerConfig {
            url: url.into(),
            queue: queue.into(),
            declare: true,
            exchange: String::new(),
            bindings: Vec::new(),
            prefetch: 32,
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            dead_letter_exchange: String::new(),
            dead_letter_routing_key: None,
            cleanup_interval: Some(Duration::from_secs(10 * 60)),
            connect_timeout: Duration::from_secs(10),
        }
    }
    /// The defaults for consuming `queue` on the local server ([`DEFAULT_URL`]).
    pub fn local(queue: impl Into<String>) -> Self {
        Self::new(DEFAULT_URL, queue)
    }
    /// Sets [`RabbitConsumerConfig::declare`].
    pub fn declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }
    /// Sets [`RabbitConsumerConfig::exchange`] and adds `routing_key` to the bindings.
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self.bindings.push(routing_key.into());
        self
    }
    /// Sets [`RabbitConsumerConfig::prefetch`].
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// Sets [`RabbitConsumerConfig::max_attempts`].
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets [`RabbitConsumerConfig::backoff_base`].
    pub fn backoff_base(mut self, d: Duration) -> Self {
        self.backoff_base = d;
        self
    }
    /// Sets [`RabbitConsumerConfig::backoff_max`].
    pub fn backoff_max(mut self, d: Duration) -> Self {
        self.backoff_max = d;
        self
    }
    /// Sets [`RabbitConsumerConfig::dead_letter_exchange`] and
    /// [`RabbitConsumerConfig::dead_letter_routing_key`].
    pub fn dead_letter(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.dead_letter_exchange = exchange.into();
        self.dead_letter_routing_key = Some(routing_key.into());
        self
    }
    /// Sets [`RabbitConsumerConfig::cleanup_interval`].
    pub fn cleanup_interval(mut self, every: Option<Duration>) -> Self {
        self.cleanup_interval = every;
        self
    }

    /// The routing key dead letters are published with.
    pub fn dead_letter_key(&self) -> String {
        self.dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }

    /// The retry delays, from `backoff_base` doubling up to `backoff_max`, jittered.
    pub fn retry_backoff(&self) -> Result<outbox::Backoff, outbox::InvalidBackoff> {
        outbox::Backoff::new(self.backoff_base, self.backoff_max)
    }
}

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

/// The open connection and its two channels.
struct Session {
    conn: Connection,
    /// Consumes (manual acks, prefetch).
    consume: Channel,
    /// Publishes dead letters, with confirms.
    dead: Channel,
    /// The deliveries (none when the session only declared).
    consumer: Option<lapin::Consumer>,
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
        if !(cfg.url.starts_with("amqp://") || cfg.url.starts_with("amqps://")) {
            return Err(ConsumerError::Config(format!(
                "url {} is not an amqp:// or amqps:// URI",
                redact_url(&cfg.url)
            )));
        }
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
        let mut next_cleanup = self.cfg.cleanup_interval.map(|every| Instant::now() + every);
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
            let end = self.consume(&session, &retry, &mut shutdown, &mut next_cleanup).await;
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

    /// Connects, declares what `declare` asks for, and starts consuming (unless `consume` is
    /// false: then the session has no consumer).
    async fn open(&self, consume_too: bool) -> Result<Session, Fatal> {
        let retry = |e: lapin::Error| Fatal::Retry(e.to_string());
        let conn = connect(&self.cfg.url, self.cfg.connect_timeout).await.map_err(retry)?;
        let consume = conn.create_channel().await.map_err(retry)?;
        let dead = conn.create_channel().await.map_err(retry)?;
        dead.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(retry)?;
        let setup = |e: lapin::Error| match e {
            lapin::Error::ProtocolError(_) => Fatal::Setup(ConsumerError::Setup {
                queue: self.cfg.queue.clone(),
                source: e,
            }),
            e => Fatal::Retry(e.to_string()),
        };
        consume
            .basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(retry)?;
        if self.cfg.declare {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            let mut args = FieldTable::default();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            consume
                .queue_declare(&self.cfg.queue, durable, args)
                .await
                .map_err(setup)?;
            for key in &self.cfg.bindings {
                consume
                    .queue_bind(
                        &self.cfg.queue,
                        &self.cfg.exchange,
                        key,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(setup)?;
            }
            if self.cfg.dead_letter_exchange.is_empty() {
                dead.queue_declare(&self.cfg.dead_letter_key(), durable, FieldTable::default())
                    .await
                    .map_err(setup)?;
            }
        }
        if !consume_too {
            return Ok(Session {
                conn,
                consume,
                dead,
                consumer: None,
            });
        }
        let consumer = consume
            .basic_consume(
                &self.cfg.queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup)?;
        tracing::info!(url = %redact_url(&self.cfg.url), queue = %self.cfg.queue, "consuming");
        Ok(Session {
            conn,
            consume,
            dead,
            consumer: Some(consumer),
        })
    }

    async fn consume(
        &self,
        session: &Session,
        retry: &RetryInPlace,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        next_cleanup: &mut Option<Instant>,
    ) -> End {
        let Some(mut consumer) = session.consumer.clone() else {
            return End::Lost("not consuming".into());
        };
        loop {
            let delivery = tokio::select! {
                _ = &mut *shutdown => return End::Shutdown,
                _ = tokio::time::sleep_until(next_cleanup.unwrap_or_else(Instant::now)), if next_cleanup.is_some() => {
                    match self.core.inbox().cleanup(self.core.pool(), 1000).await {
                        Ok(n) => tracing::debug!(deleted = n, "inbox cleanup"),
                        Err(e) => tracing::warn!(error = %e, "inbox cleanup failed; will try again"),
                    }
                    *next_cleanup = self.cfg.cleanup_interval.map(|every| Instant::now() + every);
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
                    }
                }
            }
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                // Committed but not acked: the server delivers it again, the inbox recognises it.
                return End::Lost(format!("ack failed: {e}"));
            }
        }
    }

    /// One try at a delivery: applied (or a duplicate, parked, or dead-lettered) means done;
    /// anything else means try again after a delay. `attempts` counts the handler's earlier
    /// failures only. A delivery that cannot be dead-lettered waits (and is tried again) rather
    /// than being dropped.
    async fn attempt(&self, dead: &Channel, d: &Delivery, attempts: u32, retry: &RetryInPlace) -> Step {
        let headers = header_bytes(&d.properties);
        let topic = d.routing_key.as_str();
        let headers = headers.iter().map(|(k, v)| (k.as_str(), &v[..]));
        let tried = self
            .core
            .try_once(
                topic,
                &d.data,
                headers,
                attempts,
                self.cfg.max_attempts,
                |incoming, traceparent| {
                    tracing::info_span!("inbox.process", outbox.id = %incoming.id, queue = %self.cfg.queue,
                    topic, redelivered = d.redelivered, traceparent)
                },
            )
            .await;
        self.core
            .step(tried, attempts, retry, |error, attempts| async move {
                self.dead_letter(dead, d, &error, attempts).await
            })
            .await
    }

    async fn dead_letter(&self, dead: &Channel, d: &Delivery, error: &str, attempts: u32) -> Result<(), String> {
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        let mut put = |k: &str, v: &str| {
            headers.insert(ShortString::from(k), AMQPValue::LongString(LongString::from(v)));
        };
        put(HEADER_ERROR, error);
        put(HEADER_ORIGINAL_TOPIC, d.routing_key.as_str());
        put(HEADER_ORIGINAL_EXCHANGE, d.exchange.as_str());
        put(HEADER_ORIGINAL_QUEUE, &self.cfg.queue);
        put(HEADER_ATTEMPTS, &attempts.to_string());
        let props: BasicProperties = d.properties.clone().with_headers(headers).with_delivery_mode(2);
        let routing_key = self.cfg.dead_letter_key();
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = dead
            .basic_publish(&self.cfg.dead_letter_exchange, &routing_key, opts, &d.data, props)
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                return Err(format!(
                    "dead letter unroutable: no queue bound to exchange {:?} with routing key {routing_key:?}",
                    self.cfg.dead_letter_exchange
                ))
            }
            Ok(Ok(c)) => return Err(format!("dead letter not confirmed: {c:?}")),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("dead letter not confirmed within 30 s".into()),
        }
        Ok(())
    }
}

/// Why the runner could not start consuming.
enum Fatal {
    /// Stops the runner.
    Setup(ConsumerError),
    /// Try again later (server away, connection lost).
    Retry(String),
}

/// The delivery's headers as (name, bytes): strings as they are, numbers as decimal text, other
/// kinds left out.
pub(crate) fn header_bytes(p: &BasicProperties) -> Vec<(String, Vec<u8>)> {
    let Some(table) = p.headers() else {
        return Vec::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let bytes = match v {
                AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
                AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
                AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
                AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
                AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
                AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
                AMQPValue::LongInt(n) => n.to_string().into_bytes(),
                AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
                AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
                _ => return None,
            };
            Some((k.as_str().to_owned(), bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_backoff() {
        let c = RabbitConsumerConfig::local("orders");
        assert_eq!(c.prefetch, 32);
        assert_eq!(c.max_attempts, 5);
        assert!(c.declare);
        assert_eq!(c.dead_letter_key(), "orders.dlq");
        let b = c.retry_backoff().unwrap();
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(400));
        assert_eq!(b.ceiling(30), Duration::from_secs(5));
        let d = b.delay(3);
        assert!(
            d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
            "{d:?}"
        );
        let c = RabbitConsumerConfig::new("amqp://u:s3cret@h", "q");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn headers_become_bytes() {
        let mut t = FieldTable::default();
        t.insert("outbox-id".into(), AMQPValue::LongString("abc".into()));
        t.insert("outbox-seq".into(), AMQPValue::LongLongInt(7));
        t.insert("flag".into(), AMQPValue::Boolean(true));
        let h = header_bytes(&BasicProperties::default().with_headers(t));
        assert!(h.contains(&("outbox-id".to_owned(), b"abc".to_vec())));
        assert!(h.contains(&("outbox-seq".to_owned(), b"7".to_vec())));
        assert_eq!(h.len(), 2);
    }
}
