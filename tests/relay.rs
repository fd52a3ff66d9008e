//! The relay end to end: real PostgreSQL, real Apache Kafka, an independent reader.

use std::collections::HashSet;
use std::time::Duration;

use outbox::{Message, StoreAdmin};
use outbox_kafka::KafkaPublisher;
use outbox_relay::DeadLetterPolicy;
use outbox_tests::db::scalar;
use outbox_tests::embedded::{drained, start, test_config};
use outbox_tests::kafka::{broker, check_delivery, check_delivery_skipping, create_topic, read_all, topic, PgTopic};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_over_a_hundred_keys_arrive_in_order() {
    ten_thousand_messages(100, test_config().adaptive_pace(false), &[]).await;
}

/// Lanes publish their next batch while earlier ones are in flight (the writers commit while the
/// relay runs, so batches are short; 5,000 keys, so a lane's next rows are mostly of keys not in
/// flight; the producer lingers 50 ms, so publishes outlast claims): per-key order and exactly one
/// copy on a real broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_pipelined_lanes_ten_thousand_messages_arrive_in_order() {
    let cfg = test_config().adaptive_pace(false).pipeline(4);
    ten_thousand_messages(5_000, cfg, &[("linger.ms", "50")]).await;
}

/// The adaptive pace lets fewer lanes work (and a lane rest between rounds) but hands over nothing
/// out of order and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_adaptive_pace_ten_thousand_messages_arrive_in_order() {
    ten_thousand_messages(100, test_config().adaptive_pace(true), &[]).await;
}

/// Ten thousand messages over `keys` keys, committed by four writers while the relay runs.
/// `producer`: librdkafka settings beside `bootstrap.servers`.
async fn ten_thousand_messages(keys: usize, cfg: outbox_relay::RelayConfig, producer: &[(&str, &str)]) {
    let (bootstrap, t, pool, store) = PgTopic::new("relay-10k", 8).await.into_parts();

    let settings = std::iter::once(("bootstrap.servers", bootstrap.as_str())).chain(producer.iter().copied());
    let publisher = KafkaPublisher::new(settings).unwrap();
    let relay = start(store.clone(), publisher, cfg);

    // Four writers enqueue while the relay runs; some transactions roll back.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, t) = (pool.clone(), t.clone());
        writers.push(tokio::spawn(async move {
            let mut committed = HashSet::new();
            for b in 0..25 {
                let msgs: Vec<Message> = (0..100)
                    .map(|i| {
                        Message::new(t.clone(), format!("w{w}b{b}i{i}"))
                            .key(format!("key-{}", (w * 7 + b * 100 + i) % keys))
                    })
                    .collect();
                outbox_tests::db::commit_batch(&pool, &msgs).await;
                committed.extend(msgs.iter().map(|m| m.id()));
                // A rolled-back transaction: its message must never appear.
                outbox_tests::db::roll_back(&pool, &[Message::new(t.clone(), "rolled-back").key("key-1")]).await;
            }
            committed
        }));
    }
    let expect = outbox_tests::db::all_committed(writers).await;
    assert_eq!(expect.len(), 10_000);
    drained(&store, Duration::from_secs(120)).await;
    relay.stop().await;

    let seen = read_all(&bootstrap, &t, &expect).await;
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
    let bootstrap = broker();
    let t = topic("relay-dlq");
    create_topic(&bootstrap, &t, 2).await;
    let after_big = Message::new(t.clone(), "after").key("poison");
    let others: Vec<Message> = (0..50)
        .map(|i| Message::new(t.clone(), format!("{i}")).key(format!("k{i}")))
        .collect();
    let rest: Vec<Message> = std::iter::once(after_big.clone())
        .chain(others.iter().cloned())
        .collect();
    let (store, big, publisher) = poisoned(&bootstrap, &t, &rest).await;
    let relay = start(
        store.clone(),
        publisher,
        test_config().dead_letter_policy(DeadLetterPolicy::Skip),
    );
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, big.id());
    assert!(dead[0].error.to_lowercase().contains("too large"), "{}", dead[0].error);
    let mut expect: HashSet<_> = others.iter().map(|m| m.id()).collect();
    expect.insert(after_big.id());
    let seen = read_all(&bootstrap, &t, &expect).await;
    // The dead letter is seq 1 of its key; the rest arrive in order.
    check_delivery_skipping(&seen, &expect, &HashSet::from([("poison".to_owned(), 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_committed_row_is_published() {
    let (bootstrap, t, pool, store) = PgTopic::new("relay-late", 1).await.into_parts();
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let relay = start(store.clone(), publisher, test_config());

    let mut late = pool.begin().await.unwrap();
    let low = Message::new(t.clone(), "late");
    outbox::enqueue(&mut late, &low).await.unwrap();
    let mut expect = HashSet::from([low.id()]);
    for i in 0..20 {
        let m = Message::new(t.clone(), format!("{i}"));
        expect.insert(m.id());
        outbox_tests::db::commit_each(&pool, [m]).await;
    }
    drained(&store, Duration::from_secs(30)).await;
    late.commit().await.unwrap();
    drained(&store, Duration::from_secs(30)).await;
    relay.stop().await;
    let seen = read_all(&bootstrap, &t, &expect).await;
    check_delivery(&seen, &expect);
    assert!(
        low.id() < seen.iter().map(|s| s.id).max().unwrap(),
        "the late row had the lowest id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_share_lanes_without_reordering() {
    let (bootstrap, t, pool, store) = PgTopic::new("relay-two", 4).await.into_parts();
    let mk = || KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let cfg = test_config().lease_ttl(Duration::from_secs(3));
    let a = start(store.clone(), mk(), cfg.clone().owner("relay-a".into()));
    let b = start(store.clone(), mk(), cfg.clone().owner("relay-b".into()));
    let mut expect = HashSet::new();
    for r in 0..20 {
        let msgs: Vec<Message> = (0..100)
            .map(|i| Message::new(t.clone(), format!("{r}-{i}")).key(format!("k{}", i % 30)))
            .collect();
        outbox_tests::db::commit_batch(&pool, &msgs).await;
        expect.extend(msgs.iter().map(|m| m.id()));
        if r == 5 {
            // The two relays settle on a fair split: every lane owned, each relay holding half.
            outbox_tests::wait::until("a fair split of the lanes", Duration::from_secs(30), || async {
                let lanes = store.status().await.unwrap().lanes;
                let a_n = lanes.iter().filter(|l| l.owner.as_deref() == Some("relay-a")).count();
                let b_n = lanes.iter().filter(|l| l.owner.as_deref() == Some("relay-b")).count();
                let half = outbox::LANES as usize / 2;
                if a_n == half && b_n == half {
                    Ok(())
                } else {
                    Err(format!("a={a_n}, b={b_n}"))
                }
            })
            .await;
        }
    }
    drained(&store, Duration::from_secs(60)).await;
    tokio::join!(a.stop(), b.stop());
    let seen = read_all(&bootstrap, &t, &expect).await;
    check_delivery(&seen, &expect);
    // Both relays released their lanes on shutdown.
    assert!(store.status().await.unwrap().lanes.iter().all(|l| l.owner.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_relay_without_polling() {
    let (bootstrap, t, pool, store) = PgTopic::new("relay-notify", 1).await.into_parts();
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str()), ("linger.ms", "0")]).unwrap();
    // Poll only once a minute: delivery within seconds proves the NOTIFY path.
    let relay = start(
        store.clone(),
        publisher,
        test_config().poll_interval(Duration::from_secs(60)),
    );
    outbox_tests::embedded::every_lane_idle(&pool).await;
    outbox_tests::db::commit_each(&pool, [Message::new(t.clone(), "wake").key("k")]).await;
    drained(&store, Duration::from_secs(10)).await;
    relay.stop().await;
}

/// Counts the looks at a lane that a lane whose flag said idle takes when writers it saw open
/// then have ended (the only looks here: the lanes do not linger).
#[derive(Default)]
struct Looks(std::sync::atomic::AtomicUsize);

impl outbox::observed::Observer for Looks {
    fn after(&self, call: outbox::observed::StoreCall, _: usize, _: Duration, _: bool) {
        if call == outbox::observed::StoreCall::ReadyLanes {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// `Outbox::commit` wakes an embedded relay's lanes that the committing task wrote to, with no
/// NOTIFY, no linger watch and a poll once a minute: only the in-process wake-up can publish, or a
/// lane's look after the writers open when it said idle ended (other tests' transactions), which
/// the checks below count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commit_wakes_the_embedded_relays_lane_it_wrote_to() {
    let (bootstrap, t, pool, store) = PgTopic::new("relay-local", 1).await.into_parts();
    let outbox = outbox::Outbox::new().notify(false);
    let cfg = test_config()
        .poll_interval(Duration::from_secs(60))
        .linger(Duration::ZERO);
    let looks = std::sync::Arc::new(Looks::default());
    let observed = outbox::observed::Observed::new(store.clone(), std::sync::Arc::clone(&looks));
    let relay = outbox_relay::Relay::new(observed, outbox_tests::embedded::kafka(&bootstrap, &[]))
        .config(cfg)
        .wake_on(outbox.local_wakeup());
    let relay = outbox_tests::embedded::start_relay(relay);
    let pending = || async { store.status().await.unwrap().pending };
    let looked = || looks.0.load(std::sync::atomic::Ordering::SeqCst);
    outbox_tests::embedded::every_lane_idle(&pool).await;
    let (a, b) = (
        Message::new(t.clone(), "a").key("a"),
        Message::new(t.clone(), "b").key("b"),
    );
    assert_ne!(
        outbox::lane_of(Some("a"), a.id(), outbox::LANES),
        outbox::lane_of(Some("b"), b.id(), outbox::LANES)
    );

    // A plain commit wakes nobody.
    let before = looked();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &a).await.unwrap();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a_found = pending().await == 0;
    assert!(
        !a_found || looked() > before,
        "nothing but the poll or a lane's look could publish a row committed without Outbox::commit"
    );

    // Outbox::commit from the task that enqueued wakes that lane only.
    let before = looked();
    let (p, o, b2) = (pool.clone(), outbox.clone(), b.clone());
    tokio::spawn(async move {
        let mut tx = p.begin().await.unwrap();
        o.enqueue(&mut tx, &b2).await.unwrap();
        o.commit(tx).await.unwrap();
    })
    .await
    .unwrap();
    let left = if a_found { 0 } else { 1 };
    outbox_tests::embedded::wait_for("b published", Duration::from_secs(10), || async {
        pending().await <= left
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        pending().await == left || looked() > before,
        "a's lane was not woken by b's commit"
    );

    // Outside any task (the test's own body, where a was enqueued) counts as one task: its commit wakes a's lane.
    let tx = pool.begin().await.unwrap();
    outbox.commit(tx).await.unwrap();
    drained(&store, Duration::from_secs(10)).await;
    relay.stop().await;
    let sent: HashSet<uuid::Uuid> = [a.id(), b.id()].into();
    let got: HashSet<uuid::Uuid> = read_all(&bootstrap, &t, &sent).await.iter().map(|s| s.id).collect();
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_published_rows_are_deleted_past_their_retention_on_a_schedule() {
    let (bootstrap, t, pool, _) = PgTopic::new("relay-keep", 2).await.into_parts();
    let store = outbox::postgres::PgStore::new(pool.clone()).keep_published(true);
    let msgs: Vec<Message> = (0..300)
        .map(|i| Message::new(t.clone(), format!("m{i}")).key(format!("k{}", i % 7)))
        .collect();
    outbox_tests::db::commit_batch(&pool, &msgs).await;
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let cfg = test_config()
        .cleanup_interval(Duration::from_millis(200))
        .published_retention(Duration::from_secs(20));
    let started = std::time::Instant::now();
    let relay = start(store.clone(), publisher, cfg);
    drained(&store, Duration::from_secs(60)).await;
    let kept: i64 = scalar(&pool, "SELECT count(*) FROM outbox_published").await;
    // (A drain longer than the retention would let the first rows go before the count.)
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the drain took {:?}",
        started.elapsed()
    );
    assert_eq!(kept, 300, "published rows are kept for their retention");
    outbox_tests::wait::until_empty(
        &pool,
        "outbox_published",
        "kept rows deleted after their retention",
        Duration::from_secs(60),
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_held_back_behind_a_failed_one_of_its_key_counts_no_attempt() {
    let bootstrap = broker();
    let t = topic("relay-held");
    create_topic(&bootstrap, &t, 2).await;
    let after: Vec<Message> = (0..3)
        .map(|i| Message::new(t.clone(), format!("after {i}")).key("poison"))
        .collect();
    // The rows after the refused one in the same batch are held back without being sent. With a
    // single attempt allowed, a held-back row that counted an attempt would be dead-lettered
    // without ever having been sent.
    let (store, big, publisher) = poisoned(&bootstrap, &t, &after).await;
    let cfg = test_config().dead_letter_policy(DeadLetterPolicy::Skip).max_attempts(1);
    let relay = start(store.clone(), publisher, cfg);
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let dead: Vec<uuid::Uuid> = store.dead_letters(10).await.unwrap().iter().map(|d| d.id).collect();
    assert_eq!(dead, vec![big.id()], "only the refused message is a dead letter");
    let expect: HashSet<_> = after.iter().map(|m| m.id()).collect();
    let seen = read_all(&bootstrap, &t, &expect).await;
    assert_eq!(
        check_delivery_skipping(&seen, &expect, &HashSet::from([("poison".to_owned(), 1)])),
        0
    );
}

/// A fresh database holding, committed in one transaction, a 50 kB message of key "poison" and
/// then `rest`; and a Kafka publisher that refuses messages above 20 kB (a permanent failure).
async fn poisoned(bootstrap: &str, t: &str, rest: &[Message]) -> (outbox::postgres::PgStore, Message, KafkaPublisher) {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let big = Message::new(t, vec![b'x'; 50_000]).key("poison");
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &big).await.unwrap();
    outbox::enqueue_batch(&mut tx, rest).await.unwrap();
    tx.commit().await.unwrap();
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap), ("message.max.bytes", "20000")]).unwrap();
    (store, big, publisher)
}
