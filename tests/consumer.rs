//! The consumer runner on the real broker: ack after processing, effects once under duplicates,
//! handler failures, poison messages, a restart before the offset commit, and a rebalance.
//! Here: the effect handler, the producers and the runner's start the scenarios share; the
//! scenarios are in the modules below, by topic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_kafka::{ConsumerConfig, ConsumerRunner, ConsumerStats};
use outbox_tests::consuming::{effect_counts, wait_effects};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

#[path = "consumer/delivery.rs"]
mod delivery;
#[path = "consumer/group.rs"]
mod group;
#[path = "consumer/outages.rs"]
mod outages;
#[path = "consumer/raw.rs"]
mod raw;
#[path = "consumer/retention.rs"]
mod retention;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Boom(String);

/// Writes one effect row per processed message; fails the first `fail_first` attempts of each.
#[derive(Clone, Default)]
struct Effects {
    fail_first: u32,
    poison: Option<String>,
    attempts: Arc<Mutex<HashMap<uuid::Uuid, u32>>>,
}

#[async_trait]
impl Handler<sqlx::Postgres> for Effects {
    type Error = Boom;
    async fn handle(&self, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, msg: &Incoming<'_>) -> Result<(), Boom> {
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(msg.id).or_default();
            *n += 1;
            *n
        };
        if n <= self.fail_first || self.poison.as_deref().map(str::as_bytes) == Some(msg.payload) {
            return Err(Boom(format!("attempt {n} failed on purpose")));
        }
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(msg.id)
            .execute(&mut **tx)
            .await
            .map_err(|e| Boom(e.to_string()))?;
        Ok(())
    }
}

/// Produces messages as the relay would (outbox headers), each `times` times.
async fn produce(bootstrap: &str, t: &str, n: usize, keys: usize, times: usize) -> Vec<uuid::Uuid> {
    produce_keys(bootstrap, t, "k", n, keys, times).await
}

/// Sends one keyed message with the outbox headers a relay would set.
async fn send_keyed(producer: &FutureProducer, t: &str, id: uuid::Uuid, key: &str, seq: i64) {
    send_keyed_with(producer, t, id, key, seq, "effect").await
}

/// [`send_keyed`] with the payload `payload`.
async fn send_keyed_with(producer: &FutureProducer, t: &str, id: uuid::Uuid, key: &str, seq: i64, payload: &str) {
    let (id, seq) = (id.to_string(), seq.to_string());
    let h = outbox_kafka::wire_headers([
        (outbox::HEADER_ID, Some(id.as_str())),
        (outbox::HEADER_KEY, Some(key)),
        (outbox::HEADER_SEQ, Some(seq.as_str())),
    ]);
    producer
        .send(
            FutureRecord::to(t).key(key).payload(payload).headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// Sends one unkeyed message with payload `payload` and a new `outbox-id`; returns the id.
async fn send_unkeyed(producer: &FutureProducer, t: &str, payload: &str) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    let text = id.to_string();
    let h = outbox_kafka::wire_headers([(outbox::HEADER_ID, Some(text.as_str()))]);
    producer
        .send(
            FutureRecord::<(), _>::to(t).payload(payload).headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    id
}

async fn produce_keys(bootstrap: &str, t: &str, prefix: &str, n: usize, keys: usize, times: usize) -> Vec<uuid::Uuid> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut ids = Vec::new();
    let mut seq: HashMap<String, i64> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..n {
        let id = uuid::Uuid::now_v7();
        let key = format!("{prefix}{}", i % keys);
        let s = seq.entry(key.clone()).or_default();
        *s += 1;
        ids.push(id);
        batch.push((id, key, *s));
    }
    for _ in 0..times {
        for (id, key, s) in &batch {
            send_keyed(&producer, t, *id, key, *s).await;
        }
    }
    ids
}

/// The broker, a new topic named after `name` with `partitions` partitions, and a fresh database
/// with the effects table.
async fn topic_and_db(name: &str, partitions: i32) -> (String, String, sqlx::PgPool) {
    let b = outbox_tests::kafka::broker();
    let t = outbox_tests::kafka::topic(name);
    outbox_tests::kafka::create_topic(&b, &t, partitions).await;
    (b, t, outbox_tests::effects::effects_db().await)
}

/// Starts a consumer runner of `group` on topic `t` (librdkafka settings `extra` on top of the
/// defaults); returns the stop signal, the task and the runner's live counters.
fn start(
    bootstrap: &str,
    group: &str,
    t: &str,
    pool: sqlx::PgPool,
    handler: Effects,
    cfg: ConsumerConfig,
    extra: &[(&str, &str)],
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>, Arc<ConsumerStats>) {
    let mut settings = vec![
        ("bootstrap.servers", bootstrap),
        ("group.id", group),
        ("session.timeout.ms", "6000"),
    ];
    settings.extend_from_slice(extra);
    let runner = ConsumerRunner::new(settings, &[t], pool, Inbox::new("effects"), handler)
        .unwrap()
        .config(cfg);
    let stats = runner.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        runner
            .run_until(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (tx, task, stats)
}

fn fast() -> ConsumerConfig {
    ConsumerConfig::default()
        .backoff_base(Duration::from_millis(20))
        .max_attempts(5)
}
