//! Broker helpers: real Apache Kafka (KRaft) started on 127.0.0.1 by `.ci/kafka`: the shared
//! single broker most tests use, clusters of a test's own (to kill and restart brokers), topic
//! creation, and an independent reader that collects what actually reached the topic.

mod cluster;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::metadata::Metadata;

pub use cluster::Cluster;

/// The SCRAM-SHA-512 user every broker started by `.ci/kafka` knows, and its password.
pub const SCRAM_USER: &str = "outbox";
/// Password of [`SCRAM_USER`].
pub const SCRAM_PASSWORD: &str = "outbox-secret";

/// Bootstrap address of the shared single broker (`OUTBOX_TEST_KAFKA` overrides; started by
/// `.ci/kafka up` if nothing listens on 127.0.0.1:19092).
pub fn broker() -> String {
    if let Ok(b) = std::env::var("OUTBOX_TEST_KAFKA") {
        return b;
    }
    Cluster::shared().bootstrap()
}

/// A unique topic name.
pub fn topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Where most end-to-end tests start: a fresh topic on the shared broker and a fresh PostgreSQL
/// outbox database.
pub struct PgTopic {
    pub bootstrap: String,
    pub topic: String,
    pub pool: sqlx::PgPool,
    pub store: outbox::postgres::PgStore,
}

impl PgTopic {
    /// A topic named after `prefix` with `partitions` partitions, and a migrated database.
    pub async fn new(prefix: &str, partitions: i32) -> Self {
        let bootstrap = broker();
        let topic = topic(prefix);
        create_topic(&bootstrap, &topic, partitions).await;
        let (pool, store) = crate::db::fresh_pg_store().await;
        PgTopic {
            bootstrap,
            topic,
            pool,
            store,
        }
    }

    /// `(bootstrap, topic, pool, store)`.
    pub fn into_parts(self) -> (String, String, sqlx::PgPool, outbox::postgres::PgStore) {
        (self.bootstrap, self.topic, self.pool, self.store)
    }
}

/// Client settings for `bootstrap` (add SASL and the like with `.set`).
pub fn client(bootstrap: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    cfg
}

/// Creates `name` with `partitions` partitions (the broker's default replication factor).
pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    create_topic_with(&client(bootstrap), name, partitions).await
}

/// [`create_topic`] with the given client settings. Retries while the cluster is still forming,
/// and returns once every partition has a leader in the metadata, so a producer that starts right
/// away is not told the topic does not exist.
pub async fn create_topic_with(cfg: &ClientConfig, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = cfg.create().expect("admin client");
    let start = Instant::now();
    loop {
        let res = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(-1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await;
        // The request itself can time out while a broker of the test's own is still starting.
        let res = match res {
            Ok(res) => res,
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                tracing::debug!("create topic {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => panic!("create_topics request for {name}: {e}"),
        };
        match res.into_iter().next().expect("one result") {
            Ok(_) => break,
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => break,
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                tracing::debug!("create topic {name}: {e:?}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("create topic {name}: {e:?}"),
        }
    }
    let consumer: BaseConsumer = cfg.create().expect("metadata client");
    loop {
        let md = consumer.fetch_metadata(Some(name), Duration::from_secs(5));
        if md.as_ref().is_ok_and(|md| has_leaders(md, partitions)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "topic {name} has no leaders: {md:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `md`, the metadata of one topic, shows it without error, with `partitions` partitions,
/// each with a leader.
pub fn has_leaders(md: &Metadata, partitions: i32) -> bool {
    md.topics().first().is_some_and(|t| {
        t.error().is_none()
            && t.partitions().len() == partitions as usize
            && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
    })
}

/// One record as an independent consumer saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// `outbox-id` header.
    pub id: uuid::Uuid,
    /// `outbox-key` header.
    pub key: Option<String>,
    /// `outbox-seq` header.
    pub seq: Option<i64>,
    /// Kafka message key.
    pub kafka_key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Vec<u8>,
    /// All headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where an independent reader connects: a bootstrap list (a plain client) or client settings of
/// the test's own (credentials, TLS).
pub trait ReadFrom {
    fn config(&self) -> ClientConfig;
}

impl ReadFrom for str {
    fn config(&self) -> ClientConfig {
        client(self)
    }
}

impl ReadFrom for String {
    fn config(&self) -> ClientConfig {
        client(self)
    }
}

impl ReadFrom for ClientConfig {
    fn config(&self) -> ClientConfig {
        self.clone()
    }
}

/// [`read_until`] with the usual bounds: up to 60 s for every id, then 500 ms for late duplicates.
pub async fn read_all(bootstrap: &str, topic: &str, expect: &HashSet<uuid::Uuid>) -> Vec<Seen> {
    read_until(
        bootstrap,
        topic,
        expect,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await
}

/// Reads `topic` from the beginning until every id in `expect` has been seen (duplicates are kept
/// in the result) or `deadline` passes. Then keeps reading for `linger` to catch late duplicates.
pub async fn read_until(
    from: &(impl ReadFrom + ?Sized),
    topic: &str,
    expect: &HashSet<uuid::Uuid>,
    deadline: Duration,
    linger: Duration,
) -> Vec<Seen> {
    let consumer = reader(&from.config(), topic);
    let start = Instant::now();
    let mut out = Vec::new();
    let mut missing: HashSet<uuid::Uuid> = expect.clone();
    let mut done_at: Option<Instant> = None;
    loop {
        if let Some(t) = done_at {
            if t.elapsed() >= linger {
                break;
            }
        }
        if start.elapsed() > deadline {
            break;
        }
        let Ok(res) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else {
            continue;
        };
        let Ok(m) = res else { continue };
        let seen = seen(&m);
        missing.remove(&seen.id);
        out.push(seen);
        if missing.is_empty() && done_at.is_none() {
            done_at = Some(Instant::now());
        }
    }
    out
}

/// A consumer of `topic` from its beginning, in a group of its own, committing nothing.
pub fn reader(cfg: &ClientConfig, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = cfg
        .clone()
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// What a reader saw of `m`: where it arrived, its framework headers parsed, all of it owned.
pub fn seen(m: &BorrowedMessage<'_>) -> Seen {
    let mut seen = Seen {
        partition: m.partition(),
        offset: m.offset(),
        id: uuid::Uuid::nil(),
        key: None,
        seq: None,
        kafka_key: m.key().map(|k| k.to_vec()),
        payload: m.payload().unwrap_or_default().to_vec(),
        headers: Vec::new(),
    };
    if let Some(h) = m.headers() {
        for hd in h.iter() {
            let v = hd.value.unwrap_or_default();
            let s = String::from_utf8_lossy(v).to_string();
            match hd.key {
                outbox::HEADER_ID => seen.id = s.parse().unwrap_or_default(),
                outbox::HEADER_KEY => seen.key = Some(s),
                outbox::HEADER_SEQ => seen.seq = s.parse().ok(),
                _ => {}
            }
            seen.headers.push((hd.key.to_owned(), v.to_vec()));
        }
    }
    seen
}

/// Checks what a reader saw: every expected id arrived, nothing else did, and per key the first
/// arrival of each seq is in increasing order with no gap (duplicates may repeat earlier seqs).
/// Returns the number of duplicates.
pub fn check_delivery(seen: &[Seen], expect: &HashSet<uuid::Uuid>) -> usize {
    check_delivery_skipping(seen, expect, &HashSet::new())
}

/// Like [`check_delivery`], for a run in which messages timed out in librdkafka's queue: per key the
/// last copies arrive in seq order (see [`crate::arrivals::check_last_copies`]).
pub fn check_delivery_after_timeouts(seen: &[Seen], expect: &HashSet<uuid::Uuid>) -> usize {
    crate::arrivals::check_last_copies("", in_broker_order(seen), expect)
}

/// `seen` as arrivals, in partition and offset order (a key's messages share a partition).
fn in_broker_order(seen: &[Seen]) -> Vec<crate::arrivals::Arrival<'_>> {
    let mut ordered: Vec<&Seen> = seen.iter().collect();
    ordered.sort_by_key(|s| (s.partition, s.offset));
    ordered.iter().map(|s| (s.id, s.key.as_deref(), s.seq)).collect()
}

/// Like [`check_delivery`], for a run where some (key, seq) were dead-lettered on purpose and never
/// published: first arrivals of a key may step over exactly those seqs, nothing else.
pub fn check_delivery_skipping(seen: &[Seen], expect: &HashSet<uuid::Uuid>, skipped: &HashSet<(String, i64)>) -> usize {
    crate::arrivals::check_arrivals("", in_broker_order(seen), expect, skipped)
}
