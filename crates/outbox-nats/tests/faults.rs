//! Faults on the NATS path: the server SIGKILLed and restarted on its store while writers commit,
//! a consumer cut off between its inbox commit and its ack, a poison message.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use outbox::Message;
use outbox_inbox::{Handler, Incoming};
use outbox_tests::effects::EffectRows;
use outbox_tests::embedded::{drained, start, test_config};
use outbox_tests::proxy::TcpProxy;
use outbox_tests::publisher_suite::check_delivery;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_killed_and_restarted_mid_stream_loses_nothing_and_applies_each_message_once_in_order() {
    let server = Server::start().await;
    let url = server.url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "restart").await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let effects = outbox_tests::effects::effects_db().await;
    let relay = start(store.clone(), publisher(&url).await, test_config());
    let (consumer, stats) = run_consumer(consumer_config(&url, &stream, "effects"), effects.clone(), EffectRows).await;

    // Writers commit a round of 20 keys every 40 ms for about 6 s.
    let writer = {
        let (pool, topic) = (pool.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            for round in 0..150 {
                tick.tick().await;
                let msgs: Vec<Message> = (0..20)
                    .map(|k| Message::new(topic.clone(), format!("r{round}k{k}")).key(format!("key-{k}")))
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                tx.commit().await.unwrap();
                ids.extend(msgs.iter().map(|m| m.id()));
            }
            ids
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.kill().await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        server.up().await;
    }
    let expect = writer.await.unwrap();
    drained(&store, Duration::from_secs(120)).await;
    wait_effects(&effects, expect.len() as i64, Duration::from_secs(180)).await;
    consumer.stop().await;
    relay.stop().await;

    check_effects(&effects, &expect).await;
    use outbox::StoreAdmin;
    assert!(
        store.dead_letters(10).await.unwrap().is_empty(),
        "an outage dead-letters nothing"
    );
    let seen = read_stream(&reader, &stream, expect.len(), Duration::from_secs(30)).await;
    let wire_dups = check_delivery("nats", &seen, &expect);
    eprintln!(
        "{} committed, {} on the stream ({wire_dups} duplicates stored), {} redeliveries recognised by the inbox",
        expect.len(),
        seen.len(),
        stats.duplicates.load(Relaxed)
    );
    // Every re-send came within the stream's duplicate window: stored once.
    assert_eq!(
        wire_dups, 0,
        "re-sends with the same Nats-Msg-Id are dropped by the stream"
    );
}

/// Writes the effect, then cuts the runner's connection before it can ack (once, for one message).
struct CutBeforeAck {
    target: uuid::Uuid,
    proxy: Arc<TcpProxy>,
    fired: Arc<AtomicBool>,
}

#[async_trait]
impl Handler<sqlx::Postgres> for CutBeforeAck {
    type Error = sqlx::Error;
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        msg: &Incoming<'_>,
    ) -> Result<(), sqlx::Error> {
        EffectRows.handle(tx, msg).await?;
        if msg.id == self.target && !self.fired.swap(true, Relaxed) {
            self.proxy.cut();
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_cut_off_between_its_commit_and_its_ack_applies_the_effect_once() {
    let url = shared_url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "ackcut").await;
    let effects = outbox_tests::effects::effects_db().await;
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Arc::new(TcpProxy::start(port).await);

    let p = publisher(&url).await;
    let rows: Vec<_> = (0..30)
        .map(|i| {
            outbox_tests::publisher_suite::stored(i + 1, &topic, Some(&format!("k{}", i % 3)), Some(i / 3 + 1), vec![])
        })
        .collect();
    use outbox::Publisher;
    assert!(p.publish(&rows).await.iter().all(Result::is_ok));
    let expect: HashSet<_> = rows.iter().map(|r| r.id).collect();
    let target = rows[10].id;

    // The first runner goes through the proxy; its handler cuts it off right after applying the
    // target, so the commit succeeds and the ack never reaches the server. Then it is killed.
    let fired = Arc::new(AtomicBool::new(false));
    let handler = CutBeforeAck {
        target,
        proxy: proxy.clone(),
        fired: fired.clone(),
    };
    let cfg = consumer_config(&format!("nats://127.0.0.1:{}", proxy.port), &stream, "effects");
    let first =
        outbox_nats::NatsConsumerRunner::connect(cfg, effects.clone(), outbox_inbox::Inbox::new("effects"), handler)
            .await
            .unwrap();
    let task = tokio::spawn(first.run_until(std::future::pending()));
    outbox_tests::embedded::wait_for("the target applied", Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM effects WHERE message_id = $1")
            .bind(target)
            .fetch_one(&effects)
            .await
            .unwrap()
            == 1
    })
    .await;
    task.abort();
    let _ = task.await;
    assert!(fired.load(Relaxed));

    // A second member of the same durable consumer gets the unacknowledged target again.
    let (second, stats) = run_consumer(consumer_config(&url, &stream, "effects"), effects.clone(), EffectRows).await;
    wait_effects(&effects, expect.len() as i64, Duration::from_secs(60)).await;
    outbox_tests::embedded::wait_for("the target delivered again", Duration::from_secs(30), || async {
        stats.duplicates.load(Relaxed) >= 1
    })
    .await;
    second.stop().await;
    check_effects(&effects, &expect).await;
}

/// Fails every message of one key.
struct FailKey(&'static str);

#[derive(Debug, thiserror::Error)]
#[error("refused by the handler")]
struct Refused;

#[async_trait]
impl Handler<sqlx::Postgres> for FailKey {
    type Error = Refused;
    async fn handle(&self, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, msg: &Incoming<'_>) -> Result<(), Refused> {
        if msg.key == Some(self.0) {
            return Err(Refused);
        }
        EffectRows.handle(tx, msg).await.map_err(|_| Refused)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_the_handler_always_refuses_goes_to_the_dead_letter_subject_after_max_deliver() {
    let url = shared_url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "poison").await;
    let effects = outbox_tests::effects::effects_db().await;
    let p = publisher(&url).await;
    let mut rows = vec![outbox_tests::publisher_suite::stored(
        1,
        &topic,
        Some("poison"),
        Some(1),
        b"bad".to_vec(),
    )];
    rows.extend((0..20).map(|i| {
        outbox_tests::publisher_suite::stored(i + 2, &topic, Some(&format!("k{}", i % 4)), Some(i / 4 + 1), vec![])
    }));
    use outbox::Publisher;
    assert!(p.publish(&rows).await.iter().all(Result::is_ok));
    let expect: HashSet<_> = rows[1..].iter().map(|r| r.id).collect();

    let cfg = consumer_config(&url, &stream, "effects").max_deliver(3);
    let (consumer, stats) = run_consumer(cfg, effects.clone(), FailKey("poison")).await;
    wait_effects(&effects, expect.len() as i64, Duration::from_secs(60)).await;
    let dlq = format!("{stream}_DLQ");
    let dead = read_stream(&reader, &dlq, 1, Duration::from_secs(30)).await;
    consumer.stop().await;

    check_effects(&effects, &expect).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let d = &dead[0];
    assert_eq!(d.id, rows[0].id);
    assert_eq!(d.payload, b"bad");
    let header = |n: &str| d.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(header(outbox_nats::HEADER_DELIVERIES).as_deref(), Some("3"));
    assert_eq!(
        header(outbox_nats::HEADER_ORIGINAL_STREAM).as_deref(),
        Some(stream.as_str())
    );
    assert!(header(outbox_nats::HEADER_ERROR).unwrap().contains("refused"));
    assert_eq!(stats.retries.load(Relaxed), 2, "two retries, then the dead letter");
    assert_eq!(stats.dead_lettered.load(Relaxed), 1);
}

/// The relay re-sends what it has no ack for; the stream stores it once, even when the server was
/// restarted in between (the duplicate window is rebuilt from the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_re_send_with_the_same_id_is_stored_once_even_across_a_server_restart() {
    use outbox::Publisher;
    let server = Server::start().await;
    let url = server.url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "dedup").await;
    let p = publisher(&url).await;
    let row = outbox_tests::publisher_suite::stored(1, &topic, Some("k"), Some(1), b"once".to_vec());
    let first = p.publish(std::slice::from_ref(&row)).await.remove(0).unwrap();
    let again = p.publish(std::slice::from_ref(&row)).await.remove(0).unwrap();
    assert_eq!(
        first.offset, again.offset,
        "the re-send is acknowledged with the stored sequence"
    );
    server.kill().await;
    server.up().await;
    let start = std::time::Instant::now();
    let after = loop {
        match p.publish(std::slice::from_ref(&row)).await.remove(0) {
            Ok(d) => break d,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no ack after the restart: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(after.offset, first.offset);
    let other = outbox_tests::publisher_suite::stored(2, &topic, Some("k"), Some(2), b"next".to_vec());
    p.publish(std::slice::from_ref(&other)).await.remove(0).unwrap();
    let seen = read_stream(&reader, &stream, 2, Duration::from_secs(10)).await;
    let ids: Vec<_> = seen.iter().map(|r| r.id).collect();
    assert_eq!(ids, [row.id, other.id], "stored once, then the next message");
}

/// The consumer's database goes away for longer than `max_deliver` retries would last: nothing is
/// dead-lettered, every message is applied once when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consumer_database_away_for_a_while_dead_letters_nothing() {
    use outbox::Publisher;
    let url = shared_url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "dbout").await;
    let effects = outbox_tests::effects::effects_db().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&effects)
        .await
        .unwrap();
    let db_proxy = outbox_tests::proxy::DbProxy::start().await;
    let via_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&format!("postgres://postgres@127.0.0.1:{}/{db}", db_proxy.port))
        .await
        .unwrap();

    let p = publisher(&url).await;
    let first: Vec<_> = (0..10)
        .map(|i| {
            outbox_tests::publisher_suite::stored(i + 1, &topic, Some(&format!("k{}", i % 2)), Some(i / 2 + 1), vec![])
        })
        .collect();
    assert!(p.publish(&first).await.iter().all(Result::is_ok));
    let cfg = consumer_config(&url, &stream, "effects").max_deliver(2);
    let (consumer, stats) = run_consumer(cfg, via_proxy, EffectRows).await;
    wait_effects(&effects, 10, Duration::from_secs(60)).await;

    db_proxy.cut();
    let second: Vec<_> = (10..20)
        .map(|i| {
            outbox_tests::publisher_suite::stored(i + 1, &topic, Some(&format!("k{}", i % 2)), Some(i / 2 + 1), vec![])
        })
        .collect();
    assert!(p.publish(&second).await.iter().all(Result::is_ok));
    outbox_tests::embedded::wait_for(
        "the runner met the outage several times",
        Duration::from_secs(60),
        || async { stats.infrastructure_retries.load(Relaxed) >= 4 },
    )
    .await;
    db_proxy.restore().await;
    wait_effects(&effects, 20, Duration::from_secs(60)).await;
    consumer.stop().await;

    let expect: HashSet<_> = first.iter().chain(&second).map(|r| r.id).collect();
    check_effects(&effects, &expect).await;
    assert_eq!(
        stats.dead_lettered.load(Relaxed),
        0,
        "database trouble is never the message's fault"
    );
    assert_eq!(stats.retries.load(Relaxed), 0, "nor a handler failure");
}

/// Fails the first delivery of every message whose seq is 1 modulo 3.
#[derive(Default)]
struct FailFirstTry(std::sync::Mutex<HashSet<uuid::Uuid>>);

#[async_trait]
impl Handler<sqlx::Postgres> for FailFirstTry {
    type Error = Refused;
    async fn handle(&self, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, msg: &Incoming<'_>) -> Result<(), Refused> {
        if msg.seq.is_some_and(|s| s % 3 == 1) && self.0.lock().unwrap().insert(msg.id) {
            return Err(Refused);
        }
        EffectRows.handle(tx, msg).await.map_err(|_| Refused)
    }
}

/// With several deliveries in flight a later message passes one that waits for its retry; under
/// `GapPolicy::Hold` the inbox parks it and applies it right after its predecessor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_many_in_flight_the_inbox_under_hold_keeps_each_key_in_order_through_retries() {
    use outbox::Publisher;
    let url = shared_url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "hold").await;
    let effects = outbox_tests::effects::effects_db().await;
    let p = publisher(&url).await;
    let rows: Vec<_> = (0..30)
        .map(|i| {
            outbox_tests::publisher_suite::stored(i + 1, &topic, Some(&format!("k{}", i % 3)), Some(i / 3 + 1), vec![])
        })
        .collect();
    assert!(p.publish(&rows).await.iter().all(Result::is_ok));
    let expect: HashSet<_> = rows.iter().map(|r| r.id).collect();

    let cfg = consumer_config(&url, &stream, "effects").max_ack_pending(16);
    let runner = outbox_nats::NatsConsumerRunner::connect(
        cfg,
        effects.clone(),
        outbox_inbox::Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold),
        FailFirstTry::default(),
    )
    .await
    .unwrap();
    let stats = runner.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = stopped.await;
    }));
    wait_effects(&effects, expect.len() as i64, Duration::from_secs(60)).await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    check_effects(&effects, &expect).await;
    assert!(stats.retries.load(Relaxed) >= 10, "the first tries failed");
    assert!(
        stats.parked.load(Relaxed) >= 1,
        "a successor overtook its retried predecessor and was parked"
    );
}

/// With the default `max_ack_pending = 1` nothing passes a message waiting for its retry: every key
/// is applied in order under the default gap policy too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_retries_keep_each_key_in_order_without_the_inbox_parking() {
    use outbox::Publisher;
    let url = shared_url();
    let reader = client(&url).await;
    let (topic, stream) = new_destination(&reader, "inorder").await;
    let effects = outbox_tests::effects::effects_db().await;
    let p = publisher(&url).await;
    let rows: Vec<_> = (0..30)
        .map(|i| {
            outbox_tests::publisher_suite::stored(i + 1, &topic, Some(&format!("k{}", i % 3)), Some(i / 3 + 1), vec![])
        })
        .collect();
    assert!(p.publish(&rows).await.iter().all(Result::is_ok));
    let expect: HashSet<_> = rows.iter().map(|r| r.id).collect();
    let (consumer, stats) = run_consumer(
        consumer_config(&url, &stream, "effects"),
        effects.clone(),
        FailFirstTry::default(),
    )
    .await;
    wait_effects(&effects, expect.len() as i64, Duration::from_secs(60)).await;
    consumer.stop().await;
    check_effects(&effects, &expect).await;
    assert!(stats.retries.load(Relaxed) >= 10, "the first tries failed");
    assert_eq!(stats.parked.load(Relaxed), 0);
}
