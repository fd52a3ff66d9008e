//! End to end on the shared nats-server: enqueue in a PostgreSQL transaction, the relay publishes
//! to JetStream, the consumer runner applies each message through the inbox.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox::{Message, StoreAdmin};
use outbox_relay::DeadLetterPolicy;
use outbox_tests::db::{commit_batch, roll_back};
use outbox_tests::embedded::{drained, start, test_config, wait_for};
use outbox_tests::publisher_suite::check_delivery;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_messages_reach_the_consumer_once_each_in_key_order() {
    let t = Setup::shared("e2e").await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let relay = start(store.clone(), publisher(&t.url).await, test_config());
    let (consumer, stats) = run_consumer(
        t.consumer_config(),
        t.effects.clone(),
        outbox_tests::effects::EffectRows,
    )
    .await;

    // Three writers; some transactions roll back and must never show up anywhere.
    let mut writers = Vec::new();
    for w in 0..3 {
        let (pool, topic) = (pool.clone(), t.topic.clone());
        writers.push(tokio::spawn(async move {
            let mut committed = HashSet::new();
            for b in 0..10 {
                let msgs: Vec<Message> = (0..20)
                    .map(|i| {
                        Message::new(topic.clone(), format!("w{w}b{b}i{i}")).key(format!("key.{}", (w * 7 + i) % 25))
                    })
                    .collect();
                commit_batch(&pool, &msgs).await;
                committed.extend(msgs.iter().map(|m| m.id()));
                roll_back(&pool, &[Message::new(topic.clone(), "rolled back").key("key.1")]).await;
            }
            // And unkeyed messages.
            let m = Message::new(topic.clone(), "unkeyed");
            commit_batch(&pool, std::slice::from_ref(&m)).await;
            committed.insert(m.id());
            committed
        }));
    }
    let expect = outbox_tests::db::all_committed(writers).await;
    assert_eq!(expect.len(), 603);
    drained(&store, Duration::from_secs(60)).await;
    wait_effects(&t.effects, expect.len() as i64, Duration::from_secs(120)).await;
    consumer.stop().await;
    relay.stop().await;

    check_effects(&t.effects, &expect).await;
    let seen = read_stream(&t.reader, &t.stream, expect.len(), Duration::from_secs(10)).await;
    assert_eq!(
        check_delivery("nats", &seen, &expect),
        0,
        "no faults, no duplicates on the stream"
    );
    // The key is in the subject ("key.3" is not a subject token: hex-encoded).
    let s = seen.iter().find(|r| r.key.as_deref() == Some("key.3")).unwrap();
    assert!(s
        .headers
        .iter()
        .any(|(k, v)| k == "Nats-Msg-Id" && *v == s.id.to_string()));
    let subject = outbox_nats::subject_for("", &t.topic, Some("key.3")).unwrap();
    assert_eq!(subject, format!("{}.~6b65792e33", t.topic));
    assert_eq!(stats.processed.load(std::sync::atomic::Ordering::Relaxed), 603);
}

/// A topic that no stream takes: the relay dead-letters its message (no responders is permanent)
/// and parks the key, while every other key and subject flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_without_a_stream_is_dead_lettered_and_its_key_parked_while_others_flow() {
    let url = shared_url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "nostream").await;
    let missing = format!("missing-{}", uuid::Uuid::new_v4().simple());
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());

    let poison = Message::new(missing.clone(), "nowhere").key("parked");
    let behind = Message::new(topic.clone(), "behind").key("parked");
    let others: Vec<Message> = (0..40)
        .map(|i| Message::new(topic.clone(), format!("{i}")).key(format!("k{}", i % 8)))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &poison).await.unwrap();
    outbox::enqueue(&mut tx, &behind).await.unwrap();
    outbox::enqueue_batch(&mut tx, &others).await.unwrap();
    tx.commit().await.unwrap();

    let relay = start(
        store.clone(),
        publisher(&url).await,
        test_config().dead_letter_policy(DeadLetterPolicy::Park),
    );
    let expect: HashSet<_> = others.iter().map(|m| m.id()).collect();
    wait_for(
        "the message without a stream dead-lettered",
        Duration::from_secs(30),
        || async { store.dead_letters(10).await.unwrap().len() == 1 },
    )
    .await;
    let seen = read_stream(&reader, &stream, expect.len(), Duration::from_secs(30)).await;
    relay.stop().await;

    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead[0].id, poison.id());
    assert!(dead[0].error.contains("no stream"), "{}", dead[0].error);
    assert_eq!(check_delivery("nats", &seen, &expect), 0);
    assert!(
        !seen.iter().any(|r| r.id == behind.id()),
        "the parked key's next message stays behind its dead letter"
    );
    assert_eq!(store.status().await.unwrap().pending, 1, "the parked message waits");
}

/// A durable created beforehand with settings the runner cannot keep its promises under is refused
/// at connect, naming the setting: `AckPolicy::All` (acking one message would ack those before it,
/// some still waiting for their retry) and a server `max_deliver` below the runner's (the server
/// would stop delivering a failing message before the runner dead-letters it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_durable_with_unsafe_settings_is_refused() {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let t = Setup::shared("durable").await;
    let s = async_nats::jetstream::new(t.reader.clone())
        .get_stream(&t.stream)
        .await
        .unwrap();
    for (durable, config, named) in [
        (
            "all-acks",
            pull::Config {
                durable_name: Some("all-acks".into()),
                ack_policy: AckPolicy::All,
                ..Default::default()
            },
            "ack policy",
        ),
        (
            "few-deliveries",
            pull::Config {
                durable_name: Some("few-deliveries".into()),
                ack_policy: AckPolicy::Explicit,
                max_deliver: 2,
                ..Default::default()
            },
            "max_deliver",
        ),
    ] {
        s.create_consumer(config).await.unwrap();
        let err = outbox_nats::NatsConsumerRunner::connect(
            consumer_config(&t.url, &t.stream, durable),
            t.effects.clone(),
            outbox_inbox::Inbox::new("effects"),
            outbox_tests::effects::EffectRows,
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("durable {durable} accepted"));
        assert!(err.to_string().contains(named), "{durable}: {err}");
    }
}

/// A stream that answers a moment after the publish (a clustered stream has no responder while it
/// elects its leader) takes the message: "no responders" is tried again for a moment before it
/// means that no stream takes the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_answered_no_responders_is_tried_again_for_a_moment() {
    use outbox::Publisher;
    let url = shared_url();
    let reader = client(&url).await;
    let u = uuid::Uuid::new_v4().simple().to_string();
    let (topic, stream) = (format!("late-{u}"), format!("S_{u}"));
    let p = publisher(&url).await;
    let row = outbox_tests::publisher_suite::stored(1, &topic, Some("k"), Some(1), b"late".to_vec());
    let create = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let subject = format!("{topic}.*");
        let subjects = [subject.as_str()];
        with_retry(|| outbox_nats::ensure_stream(&reader, &stream, &subjects)).await;
    });
    let out = p.publish(std::slice::from_ref(&row)).await;
    create.await.unwrap();
    assert!(out[0].is_ok(), "{:?}", out[0]);
}
