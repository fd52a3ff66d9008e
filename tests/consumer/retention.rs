//! The inbox's records over time: the runner deletes expired ones on a schedule, and an inbox
//! that forgets unkeyed messages before the topic does is reported.

use std::time::Duration;

use outbox_inbox::Inbox;
use outbox_kafka::ConsumerRunner;
use outbox_tests::kafka::topic;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use crate::{fast, send_unkeyed, topic_and_db, wait_effects, Effects};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_runner_deletes_expired_inbox_records_on_a_schedule() {
    let (b, t, pool) = topic_and_db("consume-cleanup", 1).await;
    // Unkeyed messages: the inbox keeps one record each, for its retention.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    for _ in 0..50 {
        send_unkeyed(&producer, &t, "effect").await;
    }
    let group = topic("g");
    let settings = [("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
    let inbox = Inbox::new("effects").retention(Duration::from_millis(1));
    let cfg = fast().cleanup_interval(Some(Duration::from_millis(300)));
    let runner = ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox, Effects::default())
        .unwrap()
        .config(cfg);
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = rx.await;
    }));
    wait_effects(&pool, 50, Duration::from_secs(60)).await;
    outbox_tests::wait::until_empty(
        &pool,
        "outbox_inbox_messages",
        "expired inbox records deleted",
        Duration::from_secs(30),
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inbox_that_forgets_unkeyed_messages_before_the_topic_does_is_reported() {
    let (b, t, pool) = topic_and_db("consume-retention", 1).await; // the broker's default retention: 7 days
    let group = topic("g");
    let runner = |inbox: Inbox, extra: Option<(&'static str, &'static str)>| {
        let mut settings = vec![("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
        settings.extend(extra);
        ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox, Effects::default()).unwrap()
    };
    let day = Duration::from_secs(24 * 3600);
    let short = runner(Inbox::new("effects").retention(day), None)
        .check_retention()
        .await
        .unwrap();
    assert_eq!(short.len(), 1, "{short:?}");
    assert!(
        short[0].contains(&t) && short[0].contains("retention.ms=604800000"),
        "{}",
        short[0]
    );
    let long = runner(Inbox::new("effects").retention(8 * day), None)
        .check_retention()
        .await
        .unwrap();
    assert!(long.is_empty(), "{long:?}");
    let latest = runner(
        Inbox::new("effects").retention(day),
        Some(("auto.offset.reset", "latest")),
    )
    .check_retention()
    .await
    .unwrap();
    assert!(
        latest.is_empty(),
        "a group that starts at the end reads nothing again: {latest:?}"
    );
}
