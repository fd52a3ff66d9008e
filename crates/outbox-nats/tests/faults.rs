//! Faults on the NATS path: the server SIGKILLed and restarted on its store while writers commit,
//! a consumer cut off between its inbox commit and its ack, a poison message.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::future::BoxFuture;
use outbox_inbox::Incoming;
use outbox_tests::consuming::{write_rounds, EffectRowsAfter, RefuseIf};
use outbox_tests::effects::EffectRows;
use outbox_tests::embedded::{drained, start, test_config};
use outbox_tests::proxy::TcpProxy;
use outbox_tests::publisher_suite::{check_delivery, stored};

/// What the refusing handlers of these tests say.
const REFUSED: &str = "refused by the handler";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_killed_and_restarted_mid_stream_loses_nothing_and_applies_each_message_once_in_order() {
    let server = Server::start().await;
    let t = Setup::on(server.url(), "restart").await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let relay = start(store.clone(), publisher(&t.url).await, test_config());
    let (consumer, stats) = run_consumer(t.consumer_config(), t.effects.clone(), EffectRows).await;

    // Writers commit a round of 20 keys every 40 ms for about 6 s.
    let writer = write_rounds(pool.clone(), t.topic.clone(), 150, 20);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.kill().await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        server.up().await;
    }
    let expect = writer.await.unwrap();
    drained(&store, Duration::from_secs(120)).await;
    wait_effects(&t.effects, expect.len() as i64, Duration::from_secs(180)).await;
    consumer.stop().await;
    relay.stop().await;

    check_effects(&t.effects, &expect).await;
    use outbox::StoreAdmin;
    assert!(
        store.dead_letters(10).await.unwrap().is_empty(),
        "an outage dead-letters nothing"
    );
    let seen = read_stream(&t.reader, &t.stream, expect.len(), Duration::from_secs(30)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_cut_off_between_its_commit_and_its_ack_applies_the_effect_once() {
    let t = Setup::shared("ackcut").await;
    let port: u16 = t.url.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Arc::new(TcpProxy::start(port).await);
    let rows = t.publish_keyed(0..30, 3).await;
    let expect = ids(&rows);
    let target = rows[10].id;

    // The first runner goes through the proxy; its handler cuts it off while applying the target
    // (once), so the commit succeeds and the ack never reaches the server. Then it is killed.
    let fired = Arc::new(AtomicBool::new(false));
    let handler = EffectRowsAfter({
        let (proxy, fired) = (proxy.clone(), fired.clone());
        move |msg: &Incoming<'_>| -> BoxFuture<'static, ()> {
            if msg.id == target && !fired.swap(true, Relaxed) {
                proxy.cut();
            }
            Box::pin(async {})
        }
    });
    let cfg = consumer_config(&format!("nats://127.0.0.1:{}", proxy.port), &t.stream, "effects");
    let first =
        outbox_nats::NatsConsumerRunner::connect(cfg, t.effects.clone(), outbox_inbox::Inbox::new("effects"), handler)
            .await
            .unwrap();
    let task = tokio::spawn(first.run_until(std::future::pending()));
    outbox_tests::embedded::wait_for("the target applied", Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM effects WHERE message_id = $1")
            .bind(target)
            .fetch_one(&t.effects)
            .await
            .unwrap()
            == 1
    })
    .await;
    task.abort();
    let _ = task.await;
    assert!(fired.load(Relaxed));

    // A second member of the same durable consumer gets the unacknowledged target again.
    let (second, stats) = run_consumer(t.consumer_config(), t.effects.clone(), EffectRows).await;
    wait_effects(&t.effects, expect.len() as i64, Duration::from_secs(60)).await;
    outbox_tests::embedded::wait_for("the target delivered again", Duration::from_secs(30), || async {
        stats.duplicates.load(Relaxed) >= 1
    })
    .await;
    second.stop().await;
    check_effects(&t.effects, &expect).await;
}

/// Waits until every message of `expect` is applied and a dead letter is on the stream's
/// dead-letter stream, stops `consumer`, checks the effects and that there is one dead letter;
/// returns it.
async fn applied_and_one_dead_letter(
    t: &Setup,
    consumer: outbox_tests::embedded::Running,
    expect: &HashSet<uuid::Uuid>,
) -> outbox_tests::publisher_suite::Received {
    wait_effects(&t.effects, expect.len() as i64, Duration::from_secs(60)).await;
    let dlq = format!("{}_DLQ", t.stream);
    let mut dead = read_stream(&t.reader, &dlq, 1, Duration::from_secs(30)).await;
    consumer.stop().await;
    check_effects(&t.effects, expect).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    dead.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_the_handler_always_refuses_goes_to_the_dead_letter_subject_after_max_deliver() {
    let t = Setup::shared("poison").await;
    let mut rows = vec![stored(1, &t.topic, Some("poison"), Some(1), b"bad".to_vec())];
    rows.extend((0..20).map(|i| stored(i + 2, &t.topic, Some(&format!("k{}", i % 4)), Some(i / 4 + 1), vec![])));
    t.publish(&rows).await;
    let expect = ids(&rows[1..]);

    // Fails every message of the key `poison`.
    let fail_key = RefuseIf::new(REFUSED, |msg| msg.key == Some("poison"));
    let (consumer, stats) = run_consumer(t.consumer_config().max_deliver(3), t.effects.clone(), fail_key).await;
    let d = &applied_and_one_dead_letter(&t, consumer, &expect).await;
    assert_eq!(d.id, rows[0].id);
    assert_eq!(d.payload, b"bad");
    let header = |n: &str| d.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(header(outbox_nats::HEADER_DELIVERIES).as_deref(), Some("3"));
    assert_eq!(
        header(outbox_nats::HEADER_ORIGINAL_STREAM).as_deref(),
        Some(t.stream.as_str())
    );
    assert!(header(outbox_nats::HEADER_ERROR).unwrap().contains("refused"));
    assert_eq!(stats.retries.load(Relaxed), 2, "two retries, then the dead letter");
    assert_eq!(stats.dead_lettered.load(Relaxed), 1);
}

/// Under `GapPolicy::Hold` a parked message that the handler refuses every time is the one
/// dead-lettered, on its own subject, and it leaves the inbox's parked messages; the message that
/// brought it along (applied) is acked, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_hold_a_parked_message_refused_every_time_is_the_one_dead_lettered() {
    let t = Setup::shared("hold-poison").await;
    // K:2 (refused) and K:3 are parked, then K:1 is applied and brings K:2 along.
    let k = |pos, seq, payload: &[u8]| stored(pos, &t.topic, Some("K"), Some(seq), payload.to_vec());
    let mut rows = vec![k(1, 2, b"bad"), k(2, 3, b""), k(3, 1, b"")];
    rows.extend((0..4).map(|i| stored(i + 4, &t.topic, Some(&format!("k{i}")), Some(1), vec![])));
    t.publish(&rows).await;
    let refuse = RefuseIf::new(REFUSED, |msg| msg.payload == b"bad");
    let inbox = outbox_inbox::Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold);
    let (consumer, stats) =
        run_consumer_with(t.consumer_config().max_deliver(3), t.effects.clone(), inbox, refuse).await;
    let expect: HashSet<uuid::Uuid> = std::iter::once(rows[2].id).chain(ids(&rows[3..])).collect();
    let d = &applied_and_one_dead_letter(&t, consumer, &expect).await;
    assert_eq!(d.id, rows[0].id, "the parked message's, not K:1's");
    assert_eq!(d.payload, b"bad");
    let header = |n: &str| d.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let subject = outbox_nats::subject_for("", &t.topic, Some("K")).unwrap();
    assert_eq!(header(outbox_nats::HEADER_ORIGINAL_SUBJECT), Some(subject));
    assert!(header(outbox_nats::HEADER_ERROR).unwrap().contains("parked message"));
    assert_eq!(stats.dead_lettered.load(Relaxed), 1);
    let parked: Vec<i64> = sqlx::query_scalar("SELECT seq FROM outbox_inbox_parked WHERE key = 'K'")
        .fetch_all(&t.effects)
        .await
        .unwrap();
    assert_eq!(parked, [3], "K:2 left the parked messages, K:3 waits for it");
}

/// A try longer than `ack_wait` (a slow handler, a slow database): the server took the message
/// for lost and delivered it again while the first try ran; each copy counted a delivery against
/// it (`max_deliver`) and came through again after the try. The runner now tells the server the
/// message is being worked on while it tries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_try_longer_than_ack_wait_is_not_delivered_again_meanwhile() {
    let t = Setup::shared("slow-try").await;
    let rows = t.publish_keyed(0..1, 1).await;
    let slow = EffectRowsAfter(|_: &Incoming<'_>| -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(Duration::from_millis(3500)))
    });
    let mut cfg = t.consumer_config();
    cfg.ack_wait = Duration::from_secs(1);
    let (consumer, stats) = run_consumer(cfg, t.effects.clone(), slow).await;
    wait_effects(&t.effects, 1, Duration::from_secs(30)).await;
    // A copy delivered during the try would come through now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    consumer.stop().await;
    check_effects(&t.effects, &ids(&rows)).await;
    assert_eq!(stats.duplicates.load(Relaxed), 0, "copies delivered during the try");
}

/// Two durable consumers of one stream that both dead-letter a message leave one dead letter each in
/// the shared dead-letter stream: a dead letter's `Nats-Msg-Id` names its consumer, so only a re-send
/// of the same consumer's dead letter is dropped as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_dead_lettering_one_message_leave_a_dead_letter_each() {
    let t = Setup::shared("poison-two").await;
    let row = stored(1, &t.topic, Some("poison"), Some(1), b"bad".to_vec());
    t.publish(std::slice::from_ref(&row)).await;
    let audit_db = outbox_tests::effects::effects_db().await;
    let refuse = || RefuseIf::new(REFUSED, |_| true);
    let (a, _) = run_consumer(t.consumer_config().max_deliver(1), t.effects.clone(), refuse()).await;
    let audit = consumer_config(&t.url, &t.stream, "audit").max_deliver(1);
    let (b, _) = run_consumer(audit, audit_db, refuse()).await;
    let dlq = format!("{}_DLQ", t.stream);
    let dead = read_stream(&t.reader, &dlq, 2, Duration::from_secs(30)).await;
    tokio::join!(a.stop(), b.stop());
    assert_eq!(dead.len(), 2, "one dead letter per consumer");
    assert!(dead.iter().all(|d| d.id == row.id));
}

/// The relay re-sends what it has no ack for; the stream stores it once, even when the server was
/// restarted in between (the duplicate window is rebuilt from the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_re_send_with_the_same_id_is_stored_once_even_across_a_server_restart() {
    use outbox::Publisher;
    let server = Server::start().await;
    let t = Setup::on(server.url(), "dedup").await;
    let p = &t.publisher;
    let row = stored(1, &t.topic, Some("k"), Some(1), b"once".to_vec());
    let first = p.publish(std::slice::from_ref(&row)).await.remove(0).unwrap();
    let again = p.publish(std::slice::from_ref(&row)).await.remove(0).unwrap();
    assert_eq!(
        first.offset, again.offset,
        "the re-send is acknowledged with the stored sequence"
    );
    server.kill().await;
    server.up().await;
    let after = outbox_tests::wait::until("an ack after the restart", Duration::from_secs(30), || async {
        p.publish(std::slice::from_ref(&row))
            .await
            .remove(0)
            .map_err(|e| format!("{e:?}"))
    })
    .await;
    assert_eq!(after.offset, first.offset);
    let other = stored(2, &t.topic, Some("k"), Some(2), b"next".to_vec());
    p.publish(std::slice::from_ref(&other)).await.remove(0).unwrap();
    let seen = read_stream(&t.reader, &t.stream, 2, Duration::from_secs(10)).await;
    let ids: Vec<_> = seen.iter().map(|r| r.id).collect();
    assert_eq!(ids, [row.id, other.id], "stored once, then the next message");
}

/// The consumer's database goes away for longer than `max_deliver` retries would last: nothing is
/// dead-lettered, every message is applied once when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consumer_database_away_for_a_while_dead_letters_nothing() {
    let t = Setup::shared("dbout").await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&t.effects)
        .await
        .unwrap();
    let db_proxy = outbox_tests::proxy::DbProxy::start().await;
    let via_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&format!("postgres://postgres@127.0.0.1:{}/{db}", db_proxy.port))
        .await
        .unwrap();

    let first = t.publish_keyed(0..10, 2).await;
    let (consumer, stats) = run_consumer(t.consumer_config().max_deliver(2), via_proxy, EffectRows).await;
    wait_effects(&t.effects, 10, Duration::from_secs(60)).await;

    db_proxy.cut();
    let second = t.publish_keyed(10..20, 2).await;
    outbox_tests::embedded::wait_for(
        "the runner met the outage several times",
        Duration::from_secs(60),
        || async { stats.infrastructure_retries.load(Relaxed) >= 4 },
    )
    .await;
    db_proxy.restore().await;
    t.stop_when_applied(consumer, &ids(first.iter().chain(&second))).await;
    assert_eq!(
        stats.dead_lettered.load(Relaxed),
        0,
        "database trouble is never the message's fault"
    );
    assert_eq!(stats.retries.load(Relaxed), 0, "nor a handler failure");
}

/// Fails the first delivery of every message whose seq is 1 modulo 3.
fn fail_first_try() -> RefuseIf<impl Fn(&Incoming<'_>) -> bool + Send + Sync> {
    let failed = Mutex::new(HashSet::new());
    RefuseIf::new(REFUSED, move |msg| {
        msg.seq.is_some_and(|s| s % 3 == 1) && failed.lock().unwrap().insert(msg.id)
    })
}

/// With several deliveries in flight a later message passes one that waits for its retry; under
/// `GapPolicy::Hold` the inbox parks it and applies it right after its predecessor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_many_in_flight_the_inbox_under_hold_keeps_each_key_in_order_through_retries() {
    let t = Setup::shared("hold").await;
    let rows = t.publish_keyed(0..30, 3).await;
    let (consumer, stats) = run_consumer_with(
        t.consumer_config().max_ack_pending(16),
        t.effects.clone(),
        outbox_inbox::Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold),
        fail_first_try(),
    )
    .await;
    t.stop_when_applied(consumer, &ids(&rows)).await;
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
    let t = Setup::shared("inorder").await;
    let rows = t.publish_keyed(0..30, 3).await;
    let (consumer, stats) = run_consumer(t.consumer_config(), t.effects.clone(), fail_first_try()).await;
    t.stop_when_applied(consumer, &ids(&rows)).await;
    assert!(stats.retries.load(Relaxed) >= 10, "the first tries failed");
    assert_eq!(stats.parked.load(Relaxed), 0);
}
