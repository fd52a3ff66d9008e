//! Fault injection on the embedded relay: rollback and panics inside the enqueueing transaction,
//! a full producer queue, a corrupted row, a topic the producer is not authorized for, cleanup
//! running beside the relays, and deliveries that time out after the broker stored them.
//!
//! Each scenario checks with independent readers (a plain Kafka consumer; where a consumer service
//! runs, its database): every committed message arrives, no rolled-back one ever does, per key the
//! first arrivals are in seq order, duplicates are bounded and applied once, the backlog drains with
//! only the intended poison rows dead-lettered.
//!
//! Here: the relay's start and the writers' helpers the scenarios share; the scenarios are in the
//! modules below (the writers' side, poison rows, with a consumer service).

use std::time::Duration;

use outbox::{Message, Store};
use outbox_relay::RelayConfig;
use outbox_tests::embedded::{self, test_config, Running};
use outbox_tests::kafka::topic;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

#[path = "chaos/consumers.rs"]
mod consumers;
#[path = "chaos/poison.rs"]
mod poison;
#[path = "chaos/writers.rs"]
mod writers;

type Mock = MockCluster<'static, DefaultProducerContext>;

fn config() -> RelayConfig {
    test_config().backoff_base(Duration::from_millis(100))
}

fn start(store: impl Store, bootstrap: &str, kafka: &[(&str, &str)], cfg: RelayConfig) -> Running {
    embedded::start(store, embedded::kafka(bootstrap, kafka), cfg)
}

/// A store on its own small pool (the relay's 32 lanes share 10 connections), so tests running side
/// by side stay well within the server's connection limit.
async fn small_store(pool: &sqlx::PgPool) -> outbox::postgres::PgStore {
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    outbox::postgres::PgStore::new(small)
}

/// Counts the relay's failure marks that went through: an attempt counted against a row.
#[derive(Default)]
struct Attempts(std::sync::atomic::AtomicUsize);

impl Attempts {
    fn counted(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl outbox::observed::Observer for Attempts {
    fn after(&self, call: outbox::observed::StoreCall, _: usize, _: Duration, ok: bool) {
        if ok && call == outbox::observed::StoreCall::MarkFailed {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// [`small_store`], its failure marks counted (the rows are gone once published, and their
/// attempts with them).
async fn counting_store(
    pool: &sqlx::PgPool,
) -> std::sync::Arc<outbox::observed::Observed<outbox::postgres::PgStore, Attempts>> {
    std::sync::Arc::new(outbox::observed::Observed::new(
        small_store(pool).await,
        Attempts::default(),
    ))
}

fn mock_topic(mock: &Mock, prefix: &str, partitions: i32) -> String {
    let t = topic(prefix);
    mock.create_topic(&t, partitions, 1).unwrap();
    t
}

/// A one-broker mock cluster, its bootstrap address, and a topic on it.
fn mock_with_topic(prefix: &str, partitions: i32) -> (Mock, String, String) {
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let t = mock_topic(&mock, prefix, partitions);
    (mock, bootstrap, t)
}

async fn commit(pool: &sqlx::PgPool, msgs: &[Message]) -> Vec<uuid::Uuid> {
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue_batch(&mut tx, msgs).await.unwrap();
    tx.commit().await.unwrap();
    msgs.iter().map(|m| m.id()).collect()
}

fn keyed(t: &str, n: usize, keys: usize, tag: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(t, format!("{tag}{i}")).key(format!("{tag}k{}", i % keys)))
        .collect()
}
