//! Faults on a real RabbitMQ: the server SIGKILLed and started again on its data while writers
//! commit and the relay and a consumer runner work (0 lost, per-key order, each effect once), and
//! a consumer cut off after its inbox commit and before its ack (the redelivery is recognised).

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{check_effects, declare_queue, name, url, Node};
use outbox::{Message, Publisher, StoreAdmin};
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_rabbitmq::{ConsumerStats, RabbitConfig, RabbitConsumerConfig, RabbitConsumerRunner, RabbitPublisher};
use outbox_tests::effects::{effects_db, EffectRows};
use outbox_tests::embedded::{drained, start, test_config, wait_for, Running};
use outbox_tests::proxy::TcpProxy;
use tokio::sync::Notify;

async fn effects(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn run_consumer<H: Handler<sqlx::Postgres> + 'static>(
    url: &str,
    queue: &str,
    pool: sqlx::PgPool,
    handler: H,
) -> (Running, Arc<ConsumerStats>) {
    let cfg = RabbitConsumerConfig::new(url, queue)
        .backoff_base(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(300));
    let runner = RabbitConsumerRunner::new(cfg, pool, Inbox::new("effects"), handler).unwrap();
    let stats = runner.stats();
    let running = Running::spawn(|stopped| async move {
        runner
            .run_until(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (running, stats)
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
    let (consumer, stats) = run_consumer(&node.url(), &queue, consumer_db.clone(), EffectRows);

    let (keys, rounds) = (8, 120);
    let writing = {
        let (pool, queue) = (outbox_db.clone(), queue.clone());
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            for round in 0..rounds {
                tick.tick().await;
                let msgs: Vec<Message> = (0..keys)
                    .map(|k| Message::new(&queue, format!("r{round}")).key(format!("key-{k}")))
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                tx.commit().await.unwrap();
                ids.extend(msgs.iter().map(|m| m.id()));
            }
            ids
        })
    };
    wait_for("effects before the kill", Duration::from_secs(60), || {
        let pool = consumer_db.clone();
        async move { effects(&pool).await.0 >= 80 }
    })
    .await;
    tokio::task::block_in_place(|| node.kill());
    let killed_at = store.status().await.unwrap().pending;
    wait_for(
        "the backlog to grow while the server is down",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            async move { store.status().await.unwrap().pending >= killed_at + 80 }
        },
    )
    .await;
    tokio::task::block_in_place(|| node.start());
    let committed = writing.await.unwrap();
    assert_eq!(committed.len(), keys * rounds);
    drained(&store, Duration::from_secs(180)).await;
    assert!(
        store.dead_letters(10).await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    wait_for("every committed message applied", Duration::from_secs(120), || {
        let pool = consumer_db.clone();
        async move { effects(&pool).await.1 >= (keys * rounds) as i64 }
    })
    .await;
    relay.stop().await;
    consumer.stop().await;

    let applied: HashSet<uuid::Uuid> = sqlx::query_scalar("SELECT message_id FROM effects")
        .fetch_all(&consumer_db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(applied, committed, "0 lost, nothing else applied");
    check_effects(&consumer_db, keys, rounds as i64).await;
    assert!(stats.reconnects.load(Relaxed) >= 1, "the runner reconnected");
    eprintln!(
        "restart: {} applied, {} duplicates recognised by the inbox, {} reconnects",
        applied.len(),
        stats.duplicates.load(Relaxed),
        stats.reconnects.load(Relaxed)
    );
}

/// Applies effects; for the first message it sees, says so and waits to be released before
/// applying it.
struct Gate {
    entered: Arc<Notify>,
    release: Arc<Notify>,
    first: std::sync::Mutex<Option<uuid::Uuid>>,
}

#[async_trait]
impl Handler<sqlx::Postgres> for Gate {
    type Error = sqlx::Error;
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        msg: &Incoming<'_>,
    ) -> Result<(), sqlx::Error> {
        let wait = {
            let mut first = self.first.lock().unwrap();
            if first.is_none() {
                *first = Some(msg.id);
                true
            } else {
                false
            }
        };
        if wait {
            self.entered.notify_one();
            self.release.notified().await;
        }
        EffectRows.handle(tx, msg).await
    }
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
    let gate = Gate {
        entered: entered.clone(),
        release: release.clone(),
        first: Default::default(),
    };
    let (consumer, stats) = run_consumer(&url(proxy.port), &queue, consumer_db.clone(), gate);
    tokio::time::timeout(Duration::from_secs(30), entered.notified())
        .await
        .expect("the first message reached the handler");
    // Cut while the handler is inside its transaction: the commit succeeds (the database is not
    // behind the proxy), the ack cannot be sent.
    proxy.cut();
    release.notify_one();
    wait_for("the first effect committed", Duration::from_secs(30), || {
        let pool = consumer_db.clone();
        async move { effects(&pool).await.0 >= 1 }
    })
    .await;
    proxy.restore().await;
    wait_for("every message applied", Duration::from_secs(60), || {
        let pool = consumer_db.clone();
        async move { effects(&pool).await.1 >= 20 }
    })
    .await;
    wait_for("the redelivery recognised", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { stats.duplicates.load(Relaxed) >= 1 }
    })
    .await;
    consumer.stop().await;
    assert_eq!(effects(&consumer_db).await, (20, 20), "each effect once");
    assert!(stats.reconnects.load(Relaxed) >= 1);
    check_effects(&consumer_db, 4, 5).await;
}
