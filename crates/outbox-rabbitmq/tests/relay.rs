//! End to end on the shared RabbitMQ node: enqueue in a PostgreSQL transaction -> relay ->
//! RabbitMQ -> consumer runner -> inbox effects, once each, per key in order; unroutable messages
//! dead-lettered by the relay while other keys flow; a poison message to the dead-letter queue.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{check_effects, consumer_config, declare_queue, name, queue_depth, run_consumer, Node, Reader};
use outbox::{Message, StoreAdmin};
use outbox_rabbitmq::{RabbitConfig, RabbitPublisher};
use outbox_relay::DeadLetterPolicy;
use outbox_tests::consuming::{applied_ids, effect_counts, wait_effects, RefuseIf};
use outbox_tests::db::{commit_batch, roll_back};
use outbox_tests::effects::{effects_db, EffectRows};
use outbox_tests::embedded::{drained, start, test_config, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_messages_reach_the_consumer_once_each_in_key_order() {
    let node = Node::shared();
    let queue = name("e2e");
    declare_queue(&node.url(), &queue).await;
    let outbox_db = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(outbox_db.clone());
    let consumer_db = effects_db().await;

    let publisher = RabbitPublisher::connect(RabbitConfig::new(node.url())).await.unwrap();
    let relay = start(store.clone(), publisher, test_config());
    let (consumer, stats) = run_consumer(consumer_config(&node.url(), &queue), consumer_db.clone(), EffectRows);

    // Four writers, 20 keys, 1,000 messages; every fifth transaction rolls back.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, queue) = (outbox_db.clone(), queue.clone());
        writers.push(tokio::spawn(async move {
            let mut ids = HashSet::new();
            for b in 0..25 {
                let msgs: Vec<Message> = (0..10)
                    .map(|i| Message::new(&queue, format!("w{w}b{b}i{i}")).key(format!("key-{}", w * 5 + i % 5)))
                    .collect();
                if b % 5 == 4 {
                    roll_back(&pool, &msgs).await;
                } else {
                    commit_batch(&pool, &msgs).await;
                    ids.extend(msgs.iter().map(|m| m.id()));
                }
            }
            ids
        }));
    }
    let committed = outbox_tests::db::all_committed(writers).await;
    assert_eq!(committed.len(), 800);
    drained(&store, Duration::from_secs(120)).await;
    wait_effects(&consumer_db, 800, Duration::from_secs(120)).await;
    relay.stop().await;
    consumer.stop().await;

    let applied = applied_ids(&consumer_db).await;
    assert_eq!(applied, committed, "exactly the committed messages were applied");
    assert_eq!(effect_counts(&consumer_db).await, (800, 800), "each once");
    check_effects(&consumer_db, 20, 40).await;
    assert_eq!(stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(queue_depth(&node.url(), &queue).await, 0, "everything acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_messages_are_dead_lettered_while_other_keys_flow() {
    let node = Node::shared();
    let queue = name("routable");
    declare_queue(&node.url(), &queue).await;
    let nowhere = name("no-queue-bound");
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());

    let first = Message::new(&queue, "first").key("mixed");
    let lost = Message::new(&nowhere, "to nowhere").key("mixed");
    let after = Message::new(&queue, "after").key("mixed");
    let others: Vec<Message> = (0..40)
        .map(|i| Message::new(&queue, format!("{i}")).key(format!("k{}", i % 8)))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &first).await.unwrap();
    outbox::enqueue(&mut tx, &lost).await.unwrap();
    outbox::enqueue_batch(&mut tx, &others).await.unwrap();
    outbox::enqueue(&mut tx, &after).await.unwrap();
    tx.commit().await.unwrap();

    let reader = Reader::start(node.url(), queue.clone());
    let publisher = RabbitPublisher::connect(RabbitConfig::new(node.url())).await.unwrap();
    let relay = start(
        store.clone(),
        publisher,
        test_config().dead_letter_policy(DeadLetterPolicy::Skip),
    );
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, lost.id());
    assert!(dead[0].error.contains("unroutable"), "{}", dead[0].error);
    assert!(dead[0].error.contains(&nowhere), "{}", dead[0].error);
    let seen = reader.read(42, Duration::from_secs(30)).await;
    let ids: HashSet<uuid::Uuid> = seen.iter().map(|r| r.id).collect();
    let mut expect: HashSet<uuid::Uuid> = others.iter().map(|m| m.id()).collect();
    expect.insert(first.id());
    expect.insert(after.id());
    assert_eq!(ids, expect, "every routable message arrived, and nothing else");
    let mixed: Vec<i64> = seen
        .iter()
        .filter(|r| r.key.as_deref() == Some("mixed"))
        .filter_map(|r| r.seq)
        .collect();
    assert_eq!(mixed, [1, 3], "key order kept around the dead letter");
}

/// Commits `msgs` to a fresh outbox database and runs a relay to the node at `url` until every one
/// is published.
async fn relay_all(url: &str, msgs: &[Message]) {
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue_batch(&mut tx, msgs).await.unwrap();
    tx.commit().await.unwrap();
    let publisher = RabbitPublisher::connect(RabbitConfig::new(url)).await.unwrap();
    let relay = start(store.clone(), publisher, test_config());
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_goes_to_the_dead_letter_queue_after_max_attempts() {
    let node = Node::shared();
    let queue = name("poison");
    declare_queue(&node.url(), &queue).await;
    let consumer_db = effects_db().await;
    let msgs: Vec<Message> = (0..10)
        .map(|i| {
            Message::new(&queue, if i == 3 { "poison".to_owned() } else { format!("{i}") }).key(format!("k{}", i % 2))
        })
        .collect();
    relay_all(&node.url(), &msgs).await;

    let cfg = consumer_config(&node.url(), &queue).max_attempts(3);
    let dlq = cfg.dead_letter_key();
    // Fails every message whose payload is `poison`.
    let poison_aware = RefuseIf::new("cannot apply a poison message", |msg| msg.payload == b"poison");
    let (consumer, stats) = run_consumer(cfg, consumer_db.clone(), poison_aware);
    wait_for("nine effects", Duration::from_secs(60), || {
        let pool = consumer_db.clone();
        async move { effect_counts(&pool).await.0 >= 9 }
    })
    .await;
    wait_for("the dead letter", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed) == 1 }
    })
    .await;
    consumer.stop().await;
    assert_eq!(effect_counts(&consumer_db).await, (9, 9));
    assert_eq!(
        stats.retries.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "attempts 1 and 2 retried"
    );

    let dead = Reader::start(node.url(), dlq).read(1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, msgs[3].id());
    let header = |n: &str| dead[0].headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(header(outbox_rabbitmq::HEADER_ATTEMPTS).as_deref(), Some("3"));
    assert_eq!(header(outbox_rabbitmq::HEADER_ORIGINAL_QUEUE), Some(queue.clone()));
    assert!(header(outbox_rabbitmq::HEADER_ERROR).unwrap().contains("poison"));
    assert_eq!(queue_depth(&node.url(), &queue).await, 0, "everything acked");
}

/// Under `GapPolicy::Hold` a parked message that the handler refuses every time is the one
/// dead-lettered (with its own payload and headers), and it leaves the inbox's parked messages;
/// the message that brought it along is applied and acked, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_hold_a_parked_message_refused_every_time_is_the_one_dead_lettered() {
    use outbox::Publisher;
    use outbox_tests::publisher_suite::stored;
    let node = Node::shared();
    let queue = name("hold-poison");
    declare_queue(&node.url(), &queue).await;
    let consumer_db = effects_db().await;
    // K:2 (refused) and K:3 are parked, then K:1 is applied and brings K:2 along.
    let k = |pos, seq, payload: &[u8]| stored(pos, &queue, Some("K"), Some(seq), payload.to_vec());
    let rows = [
        k(1, 2, b"poison"),
        k(2, 3, b""),
        k(3, 1, b""),
        stored(4, &queue, Some("k"), Some(1), vec![]),
    ];
    let publisher = RabbitPublisher::connect(RabbitConfig::new(node.url())).await.unwrap();
    assert!(publisher.publish(&rows).await.iter().all(Result::is_ok));

    let cfg = consumer_config(&node.url(), &queue).max_attempts(3);
    let dlq = cfg.dead_letter_key();
    let refuse = RefuseIf::new("cannot apply a poison message", |msg| msg.payload == b"poison");
    let inbox = outbox_inbox::Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold);
    let runner = outbox_rabbitmq::RabbitConsumerRunner::new(cfg, consumer_db.clone(), inbox, refuse).unwrap();
    let stats = runner.stats();
    let consumer = outbox_tests::consuming::run_until_stopped(|stop| runner.run_until(stop));
    wait_for("the dead letter", Duration::from_secs(60), || {
        let stats = stats.clone();
        async move { stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed) == 1 }
    })
    .await;
    wait_effects(&consumer_db, 2, Duration::from_secs(30)).await;
    consumer.stop().await;
    assert_eq!(applied_ids(&consumer_db).await, HashSet::from([rows[2].id, rows[3].id]));
    let dead = Reader::start(node.url(), dlq).read(1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, rows[0].id, "the parked message's, not K:1's");
    assert_eq!(dead[0].payload, b"poison");
    assert_eq!((dead[0].key.as_deref(), dead[0].seq), (Some("K"), Some(2)));
    let header = |n: &str| dead[0].headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(header(outbox_rabbitmq::HEADER_ORIGINAL_TOPIC), Some(queue.clone()));
    assert!(header(outbox_rabbitmq::HEADER_ERROR)
        .unwrap()
        .contains("parked message"));
    let parked: Vec<i64> = sqlx::query_scalar("SELECT seq FROM outbox_inbox_parked WHERE key = 'K'")
        .fetch_all(&consumer_db)
        .await
        .unwrap();
    assert_eq!(parked, [3], "K:2 left the parked messages, K:3 waits for it");
    assert_eq!(queue_depth(&node.url(), &queue).await, 0, "everything acked");
}

/// A dead-letter exchange that does not exist yet: the server closes the channel the runner
/// dead-letters on, so the runner connects again (a new channel) rather than trying a closed one for
/// ever, and once the exchange exists the dead letter goes through. It connects again after the
/// backoff's cap, not at once: each new session found the exchange missing as fast, and the runner
/// reconnected in a loop as fast as the server answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_waits_for_its_exchange_and_goes_through_once_it_exists() {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let node = Node::shared();
    let queue = name("dlx-late");
    declare_queue(&node.url(), &queue).await;
    let poison = Message::new(&queue, "poison").key("k");
    relay_all(&node.url(), std::slice::from_ref(&poison)).await;

    let (dlx, dlq) = (name("dlx"), name("dlq"));
    let cfg = consumer_config(&node.url(), &queue)
        .max_attempts(1)
        .dead_letter(&dlx, &dlq);
    let refuse = RefuseIf::new("refused", |_| true);
    let (consumer, stats) = run_consumer(cfg, effects_db().await, refuse);
    let reconnects = || stats.reconnects.load(std::sync::atomic::Ordering::Relaxed);
    // The dead letter failed (its exchange is missing) and the runner began a new session.
    wait_for("a first reconnect", Duration::from_secs(30), || async {
        reconnects() >= 1
    })
    .await;
    let first = reconnects();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no exchange yet"
    );
    // One session per backoff cap (500 ms) at the most in those 2 s (28 before).
    let more = reconnects() - first;
    assert!(more <= 5, "{more} reconnects in 2 s");

    let conn = common::connect(&node.url()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(&dlx, lapin::ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(&dlq, durable, FieldTable::default()).await.unwrap();
    ch.queue_bind(&dlq, &dlx, &dlq, QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done").await;
    wait_for("the dead letter", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed) == 1 }
    })
    .await;
    consumer.stop().await;
    let dead = Reader::start(node.url(), dlq).read(1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison.id());
    assert_eq!(queue_depth(&node.url(), &queue).await, 0, "acked after its dead letter");
}
