//! The relay end to end: real PostgreSQL, real Kafka-API broker (tansu), an independent reader.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use outbox::{Message, Store};
use outbox_kafka::KafkaPublisher;
use outbox_relay::{DeadLetterPolicy, Relay, RelayConfig};
use outbox_tests::kafka::{check_delivery, create_topic, read_until, tansu, topic};
use tokio::sync::oneshot;

fn test_config() -> RelayConfig {
    RelayConfig::default()
        .poll_interval(Duration::from_millis(100))
        .lease_ttl(Duration::from_secs(5))
        .backoff_base(Duration::from_millis(50))
        .backoff_max(Duration::from_secs(1))
}

/// Starts an embedded relay; drop or send on the returned sender to stop it.
fn start_relay(
    store: impl Store,
    publisher: KafkaPublisher,
    cfg: RelayConfig,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        Relay::new(store, publisher)
            .config(cfg)
            .run_until(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (tx, task)
}

async fn wait_drained(store: &dyn Store, within: Duration) {
    let start = std::time::Instant::now();
    loop {
        let s = store.status().await.unwrap();
        if s.pending == 0 {
            return;
        }
        assert!(start.elapsed() < within, "backlog not drained: {} pending", s.pending);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_over_a_hundred_keys_arrive_in_order() {
    let bootstrap = tansu();
    let t = topic("relay-10k");
    create_topic(&bootstrap, &t, 8).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());

    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let (stop, relay) = start_relay(store.clone(), publisher, test_config());

    // Four writers enqueue while the relay runs; some transactions roll back.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, t) = (pool.clone(), t.clone());
        writers.push(tokio::spawn(async move {
            let mut committed = HashSet::new();
            for b in 0..25 {
                let mut tx = pool.begin().await.unwrap();
                let msgs: Vec<Message> = (0..100)
                    .map(|i| Message::new(t.clone(), format!("w{w}b{b}i{i}")).key(format!("key-{}", (w * 7 + i) % 100)))
                    .collect();
                outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                tx.commit().await.unwrap();
                committed.extend(msgs.iter().map(|m| m.id()));
                // A rolled-back transaction: its message must never appear.
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue(&mut tx, &Message::new(t.clone(), "rolled-back").key("key-1"))
                    .await
                    .unwrap();
                tx.rollback().await.unwrap();
            }
            committed
        }));
    }
    let mut expect = HashSet::new();
    for w in writers {
        expect.extend(w.await.unwrap());
    }
    assert_eq!(expect.len(), 10_000);
    wait_drained(&store, Duration::from_secs(120)).await;
    stop.send(()).unwrap();
    relay.await.unwrap();

    let seen = read_until(
        &bootstrap,
        &t,
        &expect,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let dups = check_delivery(&seen, &expect);
    assert_eq!(dups, 0, "no faults, so no duplicates");
    // The wire format: Kafka key = outbox key, headers carry id/key/seq.
    let s = &seen[0];
    assert_eq!(s.kafka_key.as_deref(), s.key.as_deref().map(str::as_bytes));
    assert!(s.seq.is_some());
    // Every key landed on a single partition.
    let mut part_of = std::collections::HashMap::new();
    for s in &seen {
        assert_eq!(*part_of.entry(s.key.clone()).or_insert(s.partition), s.partition);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_message_is_dead_lettered_while_other_keys_flow() {
    let bootstrap = tansu();
    let t = topic("relay-dlq");
    create_topic(&bootstrap, &t, 2).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let mut tx = pool.begin().await.unwrap();
    let big = Message::new(t.clone(), vec![b'x'; 50_000]).key("poison");
    let after_big = Message::new(t.clone(), "after").key("poison");
    let others: Vec<Message> = (0..50)
        .map(|i| Message::new(t.clone(), format!("{i}")).key(format!("k{i}")))
        .collect();
    outbox::enqueue(&mut tx, &big).await.unwrap();
    outbox::enqueue(&mut tx, &after_big).await.unwrap();
    outbox::enqueue_batch(&mut tx, &others).await.unwrap();
    tx.commit().await.unwrap();

    // The producer refuses messages above 20 kB: a permanent failure.
    let publisher = KafkaPublisher::new([
        ("bootstrap.servers", bootstrap.as_str()),
        ("message.max.bytes", "20000"),
    ])
    .unwrap();
    let (stop, relay) = start_relay(
        store.clone(),
        publisher,
        test_config().dead_letter_policy(DeadLetterPolicy::Skip),
    );
    wait_drained(&store, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    relay.await.unwrap();

    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, big.id());
    assert!(dead[0].error.to_lowercase().contains("too large"), "{}", dead[0].error);
    let mut expect: HashSet<_> = others.iter().map(|m| m.id()).collect();
    expect.insert(after_big.id());
    let seen = read_until(
        &bootstrap,
        &t,
        &expect,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .await;
    check_delivery_skipping(&seen, &expect);
}

/// Like `check_delivery`, for a run where one seq of a key was skipped on purpose.
fn check_delivery_skipping(seen: &[outbox_tests::kafka::Seen], expect: &HashSet<uuid::Uuid>) {
    let ids: HashSet<_> = seen.iter().map(|s| s.id).collect();
    assert_eq!(&ids, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_committed_row_is_published() {
    let bootstrap = tansu();
    let t = topic("relay-late");
    create_topic(&bootstrap, &t, 1).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let (stop, relay) = start_relay(store.clone(), publisher, test_config());

    let mut late = pool.begin().await.unwrap();
    let low = Message::new(t.clone(), "late");
    outbox::enqueue(&mut late, &low).await.unwrap();
    let mut expect = HashSet::from([low.id()]);
    for i in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        let m = Message::new(t.clone(), format!("{i}"));
        outbox::enqueue(&mut tx, &m).await.unwrap();
        tx.commit().await.unwrap();
        expect.insert(m.id());
    }
    wait_drained(&store, Duration::from_secs(30)).await;
    late.commit().await.unwrap();
    wait_drained(&store, Duration::from_secs(30)).await;
    stop.send(()).unwrap();
    relay.await.unwrap();
    let seen = read_until(
        &bootstrap,
        &t,
        &expect,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .await;
    check_delivery(&seen, &expect);
    assert!(
        low.id() < seen.iter().map(|s| s.id).max().unwrap(),
        "the late row had the lowest id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_share_lanes_without_reordering() {
    let bootstrap = tansu();
    let t = topic("relay-two");
    create_topic(&bootstrap, &t, 4).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let mk = || KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let cfg = test_config().lease_ttl(Duration::from_secs(3));
    let (stop_a, a) = start_relay(store.clone(), mk(), cfg.clone().owner("relay-a".into()));
    let (stop_b, b) = start_relay(store.clone(), mk(), cfg.clone().owner("relay-b".into()));
    let mut expect = HashSet::new();
    for r in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        let msgs: Vec<Message> = (0..100)
            .map(|i| Message::new(t.clone(), format!("{r}-{i}")).key(format!("k{}", i % 30)))
            .collect();
        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        expect.extend(msgs.iter().map(|m| m.id()));
        if r == 5 {
            // The two relays settle on a fair split: every lane owned, each relay holding half.
            let start = std::time::Instant::now();
            loop {
                let lanes = store.status().await.unwrap().lanes;
                let a_n = lanes.iter().filter(|l| l.owner.as_deref() == Some("relay-a")).count();
                let b_n = lanes.iter().filter(|l| l.owner.as_deref() == Some("relay-b")).count();
                let half = outbox::LANES as usize / 2;
                if a_n == half && b_n == half {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "lanes never split fairly (a={a_n}, b={b_n})"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    wait_drained(&store, Duration::from_secs(60)).await;
    stop_a.send(()).unwrap();
    stop_b.send(()).unwrap();
    a.await.unwrap();
    b.await.unwrap();
    let seen = read_until(
        &bootstrap,
        &t,
        &expect,
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .await;
    check_delivery(&seen, &expect);
    // Both relays released their lanes on shutdown.
    assert!(store.status().await.unwrap().lanes.iter().all(|l| l.owner.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_relay_without_polling() {
    let bootstrap = tansu();
    let t = topic("relay-notify");
    create_topic(&bootstrap, &t, 1).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str()), ("linger.ms", "0")]).unwrap();
    // Poll only once a minute: delivery within seconds proves the NOTIFY path.
    let (stop, relay) = start_relay(
        store.clone(),
        publisher,
        test_config().poll_interval(Duration::from_secs(60)),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = Message::new(t.clone(), "wake").key("k");
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    wait_drained(&store, Duration::from_secs(10)).await;
    stop.send(()).unwrap();
    relay.await.unwrap();
    let _ = Arc::new(());
}
