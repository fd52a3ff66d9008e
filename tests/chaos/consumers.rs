//! With a consumer service applying what arrives: cleanup loops beside the relays never touch
//! pending rows, and deliveries that time out after the broker stored them are applied once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use outbox::{Message, StoreAdmin};
use outbox_inbox::Inbox;
use outbox_kafka::{ConsumerConfig, ConsumerRunner};
use outbox_tests::embedded::{drained, run_until_stopped, wait_for, Running};
use outbox_tests::kafka::{broker, check_delivery, create_topic, read_all, read_until, topic};

use crate::{commit, config, counting_store, keyed, mock_with_topic, small_store, start};

async fn consumer_db() -> sqlx::PgPool {
    outbox_tests::effects::effects_db().await
}

fn start_consumer(bootstrap: &str, t: &str, pool: sqlx::PgPool, inbox: Inbox) -> Running {
    let group = topic("g");
    let settings = [
        ("bootstrap.servers", bootstrap),
        ("group.id", group.as_str()),
        ("session.timeout.ms", "6000"),
    ];
    let runner = ConsumerRunner::new(settings, &[t], pool, inbox, outbox_tests::effects::EffectRows)
        .unwrap()
        .config(ConsumerConfig::default().backoff_base(Duration::from_millis(20)));
    run_until_stopped(|stop| runner.run_until(stop))
}

/// Checks the consumer's database: every expected message applied exactly once, and per key in
/// seq order. Waits (deadline) for the consumer to catch up.
async fn check_effects(pool: &sqlx::PgPool, expect: &HashSet<uuid::Uuid>, within: Duration) {
    wait_for("consumer applied every message", within, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM effects")
            .fetch_one(pool)
            .await
            .unwrap();
        n as usize >= expect.len()
    })
    .await;
    let rows: Vec<(uuid::Uuid, Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT message_id, key, seq FROM effects ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap();
    let applied: HashSet<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
    assert_eq!(rows.len(), applied.len(), "an effect was applied twice");
    assert_eq!(&applied, expect);
    let mut high = std::collections::HashMap::new();
    for (_, key, seq) in rows {
        if let (Some(k), Some(q)) = (key, seq) {
            let h = high.entry(k.clone()).or_insert(0);
            assert!(q > *h, "key {k}: seq {q} applied after seq {h}");
            *h = q;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cleanup_loops_beside_relays_never_touch_pending_rows() {
    let bootstrap = broker();
    let t = topic("cleanup");
    create_topic(&bootstrap, &t, 4).await;
    let pool = outbox_tests::db::fresh_pg().await;
    // Published rows are kept (audit), so cleanup has something to delete all along.
    let store = small_store(&pool).await.keep_published(true);
    let relays: Vec<Running> = (0..2)
        .map(|i| {
            start(
                store.clone(),
                &bootstrap,
                &[],
                config().batch_size(100).owner(format!("cleanup-relay-{i}")),
            )
        })
        .collect();
    let cdb = consumer_db().await;
    let inbox = Inbox::new("billing").retention(Duration::from_secs(3600));
    // Records older than the retention window, which the inbox cleanup must delete.
    sqlx::query(
        "INSERT INTO outbox_inbox_messages (consumer, message_id, processed_at) \
         SELECT 'billing', gen_random_uuid(), now() - interval '2 hours' FROM generate_series(1, 500)",
    )
    .execute(&cdb)
    .await
    .unwrap();
    let consumer = start_consumer(&bootstrap, &t, cdb.clone(), inbox.clone());

    let stop = Arc::new(tokio::sync::Notify::new());
    let cleaner = {
        let (store, cdb, inbox, stop) = (store.clone(), cdb.clone(), inbox.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut published, mut inboxed, mut rounds) = (0u64, 0u64, 0u64);
            loop {
                published += store.cleanup_published(Duration::ZERO, 50).await.unwrap();
                inboxed += inbox.cleanup(&cdb, 50).await.unwrap();
                rounds += 1;
                tokio::select! {
                    _ = stop.notified() => return (published, inboxed, rounds),
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        })
    };
    // Writers commit keyed and unkeyed messages while relays publish and the cleaners run.
    let mut expect = HashSet::new();
    let mut unkeyed = 0;
    for b in 0..25 {
        let mut msgs = keyed(&t, 50, 30, "c");
        msgs.extend((0..10).map(|i| Message::new(t.clone(), format!("unkeyed {b}-{i}"))));
        unkeyed += 10;
        expect.extend(commit(&pool, &msgs).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drained(&store, Duration::from_secs(60)).await;
    check_effects(&cdb, &expect, Duration::from_secs(90)).await;
    stop.notify_one();
    let (published, inboxed, rounds) = cleaner.await.unwrap();
    for r in relays {
        r.stop().await;
    }
    consumer.stop().await;
    assert!(published > 0, "the published-rows cleanup never deleted anything");
    assert_eq!(inboxed, 500, "exactly the expired inbox records are deleted");
    let fresh: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_inbox_messages")
        .fetch_one(&cdb)
        .await
        .unwrap();
    assert_eq!(fresh, unkeyed, "records inside the retention window stay");
    assert!(store.dead_letters(5).await.unwrap().is_empty());
    let seen = read_all(&bootstrap, &t, &expect).await;
    let dups = check_delivery(&seen, &expect);
    assert!(
        dups <= 100 * outbox::LANES as usize,
        "{dups} duplicates: lanes change hands only after a batch"
    );
    eprintln!(
        "cleanup: {rounds} rounds deleted {published} published rows and {inboxed} inbox records; {} delivered, {dups} duplicates",
        expect.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_timing_out_after_the_broker_stored_them_are_resent_and_applied_once() {
    let (mock, bootstrap, t) = mock_with_topic("persisted", 4);
    let pool = outbox_tests::db::fresh_pg().await;
    let store = counting_store(&pool).await;
    let cdb = consumer_db().await;
    let consumer = start_consumer(&bootstrap, &t, cdb.clone(), Inbox::new("persisted"));
    let kafka = [("message.timeout.ms", "1000")];
    let relay = start(store.clone(), &bootstrap, &kafka, config().batch_size(100));
    let mut expect: HashSet<uuid::Uuid> = commit(&pool, &keyed(&t, 200, 20, "a")).await.into_iter().collect();
    drained(&store, Duration::from_secs(60)).await;

    // The broker stores each produce at once but answers 3 s later, after the 1 s message timeout.
    mock.broker_round_trip_time(1, Duration::from_secs(3)).unwrap();
    for r in 0..4 {
        expect.extend(commit(&pool, &keyed(&t, 100, 20, &format!("slow{r}"))).await);
        expect.extend(commit(&pool, &keyed(&t, 60, 20, "a")).await);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    expect.extend(commit(&pool, &keyed(&t, 100, 20, "a")).await);
    drained(&store, Duration::from_secs(90)).await;
    relay.stop().await;
    // A timeout is not the message's fault: it counts no attempt (the duplicates below show that
    // deliveries did time out and were re-sent).
    // (Counted as the relay marks them: the rows, and their attempts, are gone once published.)
    assert_eq!(store.observer().counted(), 0, "a timeout counts no attempt");
    assert!(
        store.dead_letters(5).await.unwrap().is_empty(),
        "timeouts are retried, not dead-lettered"
    );

    let seen = read_until(&bootstrap, &t, &expect, Duration::from_secs(60), Duration::from_secs(1)).await;
    let dups = check_delivery(&seen, &expect);
    assert!(
        dups > 0,
        "timed-out deliveries had been stored: re-sending them must show duplicates"
    );
    check_effects(&cdb, &expect, Duration::from_secs(90)).await;
    consumer.stop().await;
    eprintln!(
        "possibly persisted: {} messages, {dups} duplicates on the wire, \
         each applied once",
        expect.len()
    );
}

/// The runner compares its topics' retention with the inbox's before it consumes. A cluster that
/// does not answer that question (librdkafka's mock cluster has no DescribeConfigs, a broker that
/// is slow to answer) held the first message for the admin request's timeout, a minute. The
/// question now gets a few seconds and the runner goes on without the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_that_does_not_answer_the_retention_question_does_not_hold_the_consumer() {
    let (_mock, bootstrap, t) = mock_with_topic("retention-unanswered", 1);
    let pool = outbox_tests::db::fresh_pg().await;
    let store = small_store(&pool).await;
    let cdb = consumer_db().await;
    let consumer = start_consumer(&bootstrap, &t, cdb.clone(), Inbox::new("unanswered"));
    let relay = start(store.clone(), &bootstrap, &[], config());
    let expect: HashSet<uuid::Uuid> = commit(&pool, &keyed(&t, 10, 2, "a")).await.into_iter().collect();
    // Well under the minute it took, well over a group's first join.
    check_effects(&cdb, &expect, Duration::from_secs(30)).await;
    relay.stop().await;
    consumer.stop().await;
}
