//! Broker faults injected with librdkafka's mock cluster: broker down longer than the message
//! timeout, request errors, added latency, leader moves. Nothing is lost and per-key order holds.

use std::collections::HashSet;
use std::time::Duration;

use outbox::{Message, StoreAdmin};
use outbox_tests::embedded::{self, drained, test_config, wait_for, Running};
use outbox_tests::kafka::{check_delivery, read_all, read_until};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;

/// A test's mock cluster (its bootstrap address), a topic on it and a fresh outbox database.
struct Harness {
    mock: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
    pool: sqlx::PgPool,
    store: outbox::postgres::PgStore,
    topic: String,
}

/// A mock cluster of `brokers` with a topic of `partitions`, and a fresh outbox database.
async fn harness(brokers: i32, partitions: i32) -> Harness {
    let mock = MockCluster::new(brokers).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let topic = outbox_tests::kafka::topic("fault");
    mock.create_topic(&topic, partitions, 1).unwrap();
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    Harness {
        mock,
        bootstrap,
        pool,
        store,
        topic,
    }
}

impl Harness {
    /// Starts a relay on the cluster, with `extra` producer settings.
    fn relay(&self, extra: &[(&str, &str)]) -> Running {
        let cfg = test_config().backoff_base(Duration::from_millis(100)).batch_size(100);
        embedded::start(self.store.clone(), embedded::kafka(&self.bootstrap, extra), cfg)
    }

    /// Drains the outbox (within 60 s), stops `relay`, and checks what reached the topic: every
    /// message of `expect`, nothing else, each key's seqs in order. Returns the duplicates.
    async fn drain_and_check(&self, relay: Running, expect: &HashSet<uuid::Uuid>) -> usize {
        drained(&self.store, Duration::from_secs(60)).await;
        relay.stop().await;
        let seen = read_all(&self.bootstrap, &self.topic, expect).await;
        check_delivery(&seen, expect)
    }
}

async fn enqueue(h: &Harness, n: usize, keys: usize, tag: &str) -> HashSet<uuid::Uuid> {
    let msgs: Vec<Message> = (0..n)
        .map(|i| Message::new(h.topic.clone(), format!("{tag}{i}")).key(format!("k{}", i % keys)))
        .collect();
    outbox_tests::db::commit_batch(&h.pool, &msgs).await;
    msgs.iter().map(|m| m.id()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_down_longer_than_message_timeout_loses_nothing_and_keeps_order() {
    let h = harness(1, 4).await;
    // Deliveries time out after 3 s, so the outage makes the relay itself retry with backoff.
    let relay = h.relay(&[("message.timeout.ms", "3000")]);
    let mut expect = enqueue(&h, 500, 50, "a").await;
    drained(&h.store, Duration::from_secs(30)).await;

    h.mock.broker_down(1).unwrap();
    for round in 0..5 {
        expect.extend(enqueue(&h, 200, 50, &format!("down{round}-")).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let during = h.store.status().await.unwrap().pending;
    assert!(during > 0, "nothing can be published while the broker is down");
    h.mock.broker_up(1).unwrap();
    expect.extend(enqueue(&h, 300, 50, "after").await);
    let dups = h.drain_and_check(relay, &expect).await;
    assert!(
        h.store.dead_letters(10).await.unwrap().is_empty(),
        "an outage must not dead-letter"
    );
    eprintln!("broker down 10 s: {} messages, {dups} duplicates", expect.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn produce_request_errors_and_latency_are_absorbed_in_order() {
    let h = harness(1, 2).await;
    h.mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    h.mock.broker_round_trip_time(1, Duration::from_millis(200)).unwrap();
    let relay = h.relay(&[]);
    let expect = enqueue(&h, 1000, 20, "e").await;
    h.drain_and_check(relay, &expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_leader_moves_mid_stream() {
    let h = harness(3, 3).await;
    let relay = h.relay(&[]);
    let mut expect = enqueue(&h, 300, 30, "a").await;
    for (i, leader) in [2, 3, 1].into_iter().enumerate() {
        for p in 0..3 {
            h.mock.partition_leader(&h.topic, p, Some(leader)).unwrap();
        }
        expect.extend(enqueue(&h, 300, 30, &format!("m{i}-")).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.drain_and_check(relay, &expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_topic_is_dead_lettered_and_parks_its_key_when_configured() {
    let h = harness(1, 1).await;
    let mut tx = h.pool.begin().await.unwrap();
    let bad = Message::new("no-such-topic-anywhere", "x").key("parked-key");
    let behind = Message::new(h.topic.clone(), "behind").key("parked-key");
    let other = Message::new(h.topic.clone(), "other").key("free-key");
    outbox::enqueue_batch(&mut tx, &[bad.clone(), behind.clone(), other.clone()])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let publisher = embedded::kafka(
        &h.bootstrap,
        &[
            ("allow.auto.create.topics", "false"),
            ("topic.metadata.propagation.max.ms", "500"),
            ("message.timeout.ms", "5000"),
        ],
    );
    let cfg = test_config()
        .dead_letter_policy(outbox_relay::DeadLetterPolicy::Park)
        .max_attempts(3);
    let relay = embedded::start(h.store.clone(), publisher, cfg);
    wait_for("dead-lettered", Duration::from_secs(60), || async {
        !h.store.dead_letters(10).await.unwrap().is_empty()
    })
    .await;
    // The parked key's next message waits; the other key flows.
    wait_for("the other key's row published", Duration::from_secs(30), || async {
        h.store.status().await.unwrap().pending == 1
    })
    .await;
    let dl = h.store.dead_letters(10).await.unwrap();
    assert_eq!(dl[0].id, bad.id());
    assert!(dl[0].parked);
    // Operator discards the poison message: the key moves on.
    assert!(h.store.discard_dead_letter(bad.id()).await.unwrap());
    drained(&h.store, Duration::from_secs(30)).await;
    relay.stop().await;
    let expect = HashSet::from([behind.id(), other.id()]);
    let seen = read_until(
        &h.bootstrap,
        &h.topic,
        &expect,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .await;
    let ids: HashSet<_> = seen.iter().map(|s| s.id).collect();
    assert_eq!(ids, expect);
}
