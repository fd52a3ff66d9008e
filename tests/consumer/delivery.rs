//! Delivery through the runner: effects once under duplicates and a restart before the offset
//! commit, handler failures retried, poison messages dead-lettered, and `Hold` never stalling it.

use std::collections::HashSet;
use std::time::Duration;

use outbox_inbox::Inbox;
use outbox_kafka::ConsumerRunner;
use outbox_tests::effects::effects_db;
use outbox_tests::kafka::{broker, create_topic, read_until, topic};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use crate::{
    effect_counts, fast, produce, send_keyed, send_keyed_with, send_unkeyed, start, topic_and_db, wait_effects, Effects,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_delivered_twice_has_its_effect_once() {
    let (b, t, pool) = topic_and_db("consume-twice", 2).await;
    let ids = produce(&b, &t, 200, 10, 2).await;
    let group = topic("g");
    let (stop, task, _) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (200, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_before_offset_commit_redelivers_and_the_effect_stays_single() {
    let (b, t, pool) = topic_and_db("consume-restart", 1).await;
    let ids = produce(&b, &t, 100, 5, 1).await;
    let group = topic("g");
    // No auto-commit: the first consumer dies with its DB work committed and no offset committed.
    let handler = Effects::default();
    let (_stop, task, _) = start(
        &b,
        &group,
        &t,
        pool.clone(),
        handler.clone(),
        fast(),
        &[("enable.auto.commit", "false")],
    );
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    task.abort(); // the process "dies": no graceful commit
    let _ = task.await;
    let first: u32 = handler.attempts.lock().unwrap().values().sum();
    assert_eq!(first, 100);

    let handler2 = Effects::default();
    let (stop, task, stats) = start(&b, &group, &t, pool.clone(), handler2.clone(), fast(), &[]);
    outbox_tests::embedded::wait_for("all 100 redelivered", Duration::from_secs(60), || {
        let n = stats.duplicates.load(std::sync::atomic::Ordering::Relaxed);
        async move { n == 100 }
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap();
    // The second consumer received all 100 again (it committed offset 100 for them) ...
    assert_eq!(
        committed(&b, &group, &t).await,
        100,
        "messages were redelivered and acked"
    );
    // ... and the inbox recognised every one: the handler never ran, the effects stayed single.
    assert_eq!(
        handler2.attempts.lock().unwrap().values().sum::<u32>(),
        0,
        "duplicates never reach the handler"
    );
    assert_eq!(effect_counts(&pool).await, (100, 100));
}

/// The group's committed offset of partition 0.
async fn committed(bootstrap: &str, group: &str, t: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(t, 0);
    let tpl = tokio::task::spawn_blocking(move || c.committed_offsets(tpl, Duration::from_secs(10)).unwrap())
        .await
        .unwrap();
    match tpl.find_partition(t, 0).unwrap().offset() {
        rdkafka::Offset::Offset(o) => o,
        other => panic!("no committed offset: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handler_failing_twice_then_succeeding_has_its_effect_once() {
    let (b, t, pool) = topic_and_db("consume-retry", 1).await;
    let ids = produce(&b, &t, 30, 3, 1).await;
    let handler = Effects {
        fail_first: 2,
        ..Default::default()
    };
    let group = topic("g");
    let (stop, task, _) = start(&b, &group, &t, pool.clone(), handler.clone(), fast(), &[]);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (30, 30));
    assert!(handler.attempts.lock().unwrap().values().all(|n| *n == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_go_to_the_dead_letter_topic_and_later_messages_go_on() {
    let b = broker();
    let t = topic("consume-poison");
    let dlq = format!("{t}.dlq");
    create_topic(&b, &t, 1).await;
    create_topic(&b, &dlq, 1).await;
    let pool = effects_db().await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    // 1) no outbox-id header at all; 2) a handler that always fails on payload "poison".
    producer
        .send(
            FutureRecord::<(), _>::to(&t).payload("no headers"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let pid = send_unkeyed(&producer, &t, "poison").await;
    let ids = produce(&b, &t, 20, 2, 1).await;
    let handler = Effects {
        poison: Some("poison".into()),
        ..Default::default()
    };
    let group = topic("g");
    let (stop, task, _) = start(&b, &group, &t, pool.clone(), handler, fast().max_attempts(3), &[]);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (20, 20));
    let expect: HashSet<uuid::Uuid> = HashSet::from([pid]);
    let dead = read_until(&b, &dlq, &expect, Duration::from_secs(30), Duration::from_secs(1)).await;
    assert_eq!(dead.len(), 2, "both poison messages are on the dead-letter topic");
    let errs: Vec<String> = dead
        .iter()
        .map(|d| {
            let e = d
                .headers
                .iter()
                .find(|(k, _)| k == outbox_kafka::HEADER_ERROR)
                .expect("error header");
            String::from_utf8_lossy(&e.1).into_owned()
        })
        .collect();
    assert!(errs.iter().any(|e| e.contains("outbox-id")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("failed on purpose")), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_hold_a_successor_ahead_of_its_predecessor_never_stalls_the_runner() {
    let (b, t, pool) = topic_and_db("consume-hold", 1).await;
    // One partition: K:2, then other keys, then K:1 (as after a relay's re-send), then more others.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    let send = |key: String, seq: i64| {
        let producer = producer.clone();
        let t = t.clone();
        async move {
            let id = uuid::Uuid::now_v7();
            send_keyed(&producer, &t, id, &key, seq).await;
            id
        }
    };
    let k2 = send("K".into(), 2).await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(send(format!("other-{i}"), 1).await);
    }
    let k1 = send("K".into(), 1).await;
    for i in 20..40 {
        others.push(send(format!("other-{i}"), 1).await);
    }
    let group = topic("g");
    let settings = [("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
    let inbox = Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold);
    let runner = ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox, Effects::default())
        .unwrap()
        .config(fast());
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = rx.await;
    }));
    wait_effects(&pool, 42, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("shutdown returns")
        .unwrap()
        .unwrap();
    assert_eq!(effect_counts(&pool).await, (42, 42), "every effect exactly once");
    let order: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT message_id FROM effects ORDER BY n")
        .fetch_all(&pool)
        .await
        .unwrap();
    let pos = |id: uuid::Uuid| order.iter().position(|x| *x == id).unwrap();
    assert!(pos(k1) < pos(k2), "K:1 applied before K:2");
    assert_eq!(pos(k2), pos(k1) + 1, "K:2 applied right after K:1");
    assert!(
        others.iter().take(20).all(|o| pos(*o) < pos(k1)),
        "the keys behind K:2 did not wait for K:1"
    );
}

/// Under `Hold`, a parked message whose handler fails every time was never dead-lettered: the
/// runner retried the message it came with (applied already), dead-lettered that one instead, and
/// the parked one stayed, holding its key for ever (`release_parked` ran the handler on it too).
/// Now the parked message itself goes to the dead-letter topic and out of the inbox's tables: its
/// key waits for it as for any message dead-lettered under `Hold`, and `release_parked` goes past
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_hold_a_parked_message_that_always_fails_is_the_one_dead_lettered() {
    let (b, t, pool) = topic_and_db("consume-hold-poison", 1).await;
    let dlq = format!("{t}.dlq");
    create_topic(&b, &dlq, 1).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    // K:2 (poison) and K:3 are parked, then K:1 is applied and brings K:2 along, which fails.
    let [k1, k2, k3] = [(); 3].map(|_| uuid::Uuid::now_v7());
    send_keyed_with(&producer, &t, k2, "K", 2, "poison").await;
    send_keyed(&producer, &t, k3, "K", 3).await;
    send_keyed(&producer, &t, k1, "K", 1).await;
    let others = produce(&b, &t, 5, 5, 1).await;
    let group = topic("g");
    let settings = [("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
    let inbox = Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold);
    let handler = Effects {
        poison: Some("poison".into()),
        ..Default::default()
    };
    let runner = ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox.clone(), handler)
        .unwrap()
        .config(fast().max_attempts(3));
    let stats = runner.stats();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = rx.await;
    }));
    wait_effects(&pool, 1 + others.len() as i64, Duration::from_secs(60)).await;
    let dead = read_until(
        &b,
        &dlq,
        &HashSet::from([k2]),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let dead_ids: Vec<uuid::Uuid> = dead.iter().map(|d| d.id).collect();
    assert_eq!(dead_ids, [k2], "the parked message is the one dead-lettered, once");
    assert_eq!(dead[0].payload, b"poison", "with its own payload");
    assert_eq!((dead[0].key.as_deref(), dead[0].seq), (Some("K"), Some(2)));
    assert_eq!(stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 1);
    let parked: Vec<i64> = sqlx::query_scalar("SELECT seq FROM outbox_inbox_parked WHERE key = 'K' ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(parked, [3], "K:2 left the parked messages, K:3 waits for it");
    // An operator gives up on K:2: K:3 is applied, K:2 stays an open gap (a replay is applied).
    let released = inbox
        .release_parked(&pool, None, "K", &Effects::default())
        .await
        .unwrap();
    assert_eq!(released, 1);
    assert_eq!(effect_counts(&pool).await, (7, 7));
}

/// A header name that is not UTF-8 (any client but rdkafka's and Java's can send one): rdkafka's
/// header iterator panics on it (`to_str().unwrap()`), so the runner's task died before the
/// message was processed, and again on it after every restart. Such a header is now left out: the
/// message is applied, and so are the ones after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_name_that_is_not_utf8_does_not_stop_the_runner() {
    let (b, t, pool) = topic_and_db("consume-header-bytes", 1).await;
    let id = uuid::Uuid::now_v7().to_string();
    let headers: [(&[u8], &[u8]); 2] = [(outbox::HEADER_ID.as_bytes(), id.as_bytes()), (b"\xffname", b"value")];
    crate::raw::produce(&b, &t, b"effect", &headers).await;
    let after = produce(&b, &t, 5, 5, 1).await;
    let group = topic("g");
    let (stop, task, _) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    wait_effects(&pool, 1 + after.len() as i64, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (6, 6));
}
