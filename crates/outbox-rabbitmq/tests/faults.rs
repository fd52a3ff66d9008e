//! Faults on a real RabbitMQ: the server SIGKILLed and started again on its data while writers
//! commit and the relay and a consumer runner work (0 lost, per-key order, each effect once), and
//! a consumer cut off after its inbox commit and before its ack (the redelivery is recognised).

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{check_effects, consumer_config, declare_queue, name, queue_depth, run_consumer, url, Node};
use futures::future::BoxFuture;
use outbox::{Publisher, StoreAdmin};
use outbox_inbox::Incoming;
use outbox_rabbitmq::{RabbitConfig, RabbitPublisher};
use outbox_tests::consuming::{applied_ids, effect_counts, wait_effects, write_rounds, EffectRowsAfter};
use outbox_tests::effects::{effects_db, EffectRows};
use outbox_tests::embedded::{drained, start, test_config, wait_for};
use outbox_tests::proxy::TcpProxy;
use tokio::sync::Notify;

/// Consumer settings for the fault tests: retries capped at 300 ms.
fn quick_config(url: &str, queue: &str) -> outbox_rabbitmq::RabbitConsumerConfig {
    consumer_config(url, queue).backoff_max(Duration::from_millis(300))
}

/// What the fault tests rest on: `.ci/rabbitmq kill` writes the node's metadata log out first, so a
/// durable queue declared right before a SIGKILL is there after the restart (RabbitMQ 3.10 holds
/// queue declarations in memory for up to 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_right_before_a_kill_is_there_after_the_restart() {
    let node = tokio::task::block_in_place(Node::dedicated);
    let queue = name("declared");
    declare_queue(&node.url(), &queue).await;
    tokio::task::block_in_place(|| node.kill());
    tokio::task::block_in_place(|| node.start());
    assert_eq!(queue_depth(&node.url(), &queue).await, 0, "the queue is there, empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_killed_and_restarted_mid_stream_loses_nothing_and_applies_each_effect_once_in_key_order() {
    let node = tokio::task::block_in_place(Node::dedicated);
    let queue = name("restart");
    declare_queue(&node.url(), &queue).await;
    let outbox_db = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(outbox_db.clone());
    let consumer_db = effects_db().await;
    let cfg = RabbitConfig::new(node.url()).confirm_timeout(Duration::from_secs(5));
    let publisher = RabbitPublisher::connect(cfg).await.unwrap();
    let relay = start(store.clone(), publisher, test_config().batch_size(50));
    let (consumer, stats) = run_consumer(quick_config(&node.url(), &queue), consumer_db.clone(), EffectRows);

    let (keys, rounds) = (8, 120);
    let writing = write_rounds(outbox_db.clone(), queue.clone(), rounds, keys);
    wait_for("effects before the kill", Duration::from_secs(60), || {
        let pool = consumer_db.clone();
        async move { effect_counts(&pool).await.0 >= 80 }
    })
    .await;
    tokio::task::block_in_place(|| node.kill());
    // Commits while the server is down, whether or not the paced writer is still going (on a slow
    // machine it can finish before the kill lands): none of them can be marked before the restart.
    let during = write_rounds(outbox_db.clone(), queue.clone(), 10, keys).await.unwrap();
    let pending = store.status().await.unwrap().pending;
    assert!(
        pending >= during.len() as i64,
        "{pending} pending, but {} were committed while the server is down",
        during.len()
    );
    tokio::task::block_in_place(|| node.start());
    let mut committed = writing.await.unwrap();
    assert_eq!(committed.len(), keys * rounds);
    committed.extend(during);
    drained(&store, Duration::from_secs(180)).await;
    assert!(
        store.dead_letters(10).await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    wait_effects(&consumer_db, committed.len() as i64, Duration::from_secs(120)).await;
    relay.stop().await;
    consumer.stop().await;

    let applied = applied_ids(&consumer_db).await;
    assert_eq!(applied, committed, "0 lost, nothing else applied");
    check_effects(&consumer_db, keys, rounds as i64 + 10).await;
    assert!(stats.reconnects.load(Relaxed) >= 1, "the runner reconnected");
    eprintln!(
        "restart: {} applied, {} duplicates recognised by the inbox, {} reconnects",
        applied.len(),
        stats.duplicates.load(Relaxed),
        stats.reconnects.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_cut_off_after_its_commit_and_before_its_ack_applies_the_effect_once() {
    let node = Node::shared();
    let queue = name("cut-before-ack");
    declare_queue(&node.url(), &queue).await;
    let publisher = RabbitPublisher::connect(RabbitConfig::new(node.url())).await.unwrap();
    let rows: Vec<outbox::StoredMessage> = (1..=20)
        .map(|i| {
            let key = format!("k{}", i % 4);
            outbox_tests::publisher_suite::stored(i, &queue, Some(&key), Some((i - 1) / 4 + 1), b"x".to_vec())
        })
        .collect();
    for r in publisher.publish(&rows).await {
        r.unwrap();
    }

    let consumer_db = effects_db().await;
    let proxy = TcpProxy::start(node.port).await;
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    // The first message to reach the handler says so and waits to be released before its effect.
    let gated = AtomicBool::new(false);
    let gate = EffectRowsAfter({
        let (entered, release) = (entered.clone(), release.clone());
        move |_: &Incoming<'_>| -> BoxFuture<'static, ()> {
            let (entered, release) = (entered.clone(), release.clone());
            let wait = !gated.swap(true, Relaxed);
            Box::pin(async move {
                if wait {
                    entered.notify_one();
                    release.notified().await;
                }
            })
        }
    });
    let (consumer, stats) = run_consumer(quick_config(&url(proxy.port), &queue), consumer_db.clone(), gate);
    tokio::time::timeout(Duration::from_secs(30), entered.notified())
        .await
        .expect("the first message reached the handler");
    // Cut while the handler is inside its transaction: the commit succeeds (the database is not
    // behind the proxy), the ack cannot be sent.
    proxy.cut();
    release.notify_one();
    wait_for("the first effect committed", Duration::from_secs(30), || {
        let pool = consumer_db.clone();
        async move { effect_counts(&pool).await.0 >= 1 }
    })
    .await;
    proxy.restore().await;
    wait_effects(&consumer_db, 20, Duration::from_secs(60)).await;
    wait_for("the redelivery recognised", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { stats.duplicates.load(Relaxed) >= 1 }
    })
    .await;
    consumer.stop().await;
    assert_eq!(effect_counts(&consumer_db).await, (20, 20), "each effect once");
    assert!(stats.reconnects.load(Relaxed) >= 1);
    check_effects(&consumer_db, 4, 5).await;
}

/// A resource alarm (memory, disk) blocks every connection that publishes: lapin then writes
/// nothing more on it, not even the close of the channel it abandons after a confirm timeout. That
/// close had no timeout: a publish during an alarm returned only when the alarm ended, and its lane
/// stalled instead of backing off. Each publish now answers `Unavailable` within its timeouts, and
/// the messages go through once the alarm is over. The blocked connection is kept: giving it up
/// opened a new one at every try, blocked in turn, for as long as the alarm lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_during_a_resource_alarm_answers_unavailable_within_its_timeouts() {
    let node = tokio::task::block_in_place(Node::dedicated);
    let queue = name("alarm");
    declare_queue(&node.url(), &queue).await;
    let cfg = RabbitConfig::new(node.url()).confirm_timeout(Duration::from_secs(2));
    let publisher = RabbitPublisher::connect(cfg).await.unwrap();
    let row = |pos: i64| outbox_tests::publisher_suite::stored(pos, &queue, None, None, b"x".to_vec());
    assert!(publisher.publish(&[row(0)]).await[0].is_ok());
    tokio::task::block_in_place(|| node.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]));
    for pos in 1..=4 {
        let out = tokio::time::timeout(Duration::from_secs(20), publisher.publish(&[row(pos)]))
            .await
            .unwrap_or_else(|_| panic!("publish {pos} did not return within 20 s of a resource alarm"));
        assert!(
            matches!(&out[0], Err(e) if e.kind == outbox::FailureKind::Unavailable),
            "{out:?}"
        );
    }
    // The blocked connection is kept (the server unblocks it when the alarm ends), not given up
    // for a new one at every publish, which the alarm blocks too: one per retry for as long as it
    // lasts.
    let connections = tokio::task::block_in_place(|| node.ctl(&["list_connections", "--silent", "state"]));
    assert_eq!(
        connections.lines().count(),
        1,
        "connections during the alarm: {connections}"
    );
    tokio::task::block_in_place(|| node.ctl(&["set_vm_memory_high_watermark", "0.4"]));
    wait_for(
        "a publish to go through after the alarm",
        Duration::from_secs(60),
        || async {
            matches!(
                tokio::time::timeout(Duration::from_secs(20), publisher.publish(&[row(3)])).await,
                Ok(out) if out[0].is_ok()
            )
        },
    )
    .await;
}
