//! The inbox on a real PostgreSQL: every redelivery is recognised, the handler's effect commits once
//! with the dedup record, gaps follow the policy, concurrent deliveries run the effect once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use outbox_inbox::{GapPolicy, Handler, Inbox, InboxError, Incoming, Outcome};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The business table the test handler writes to: one row per time its effect committed.
async fn pool() -> PgPool {
    let pool = outbox_tests::db::fresh_pg().await;
    sqlx::query("CREATE TABLE effects (n BIGSERIAL PRIMARY KEY, message_id UUID NOT NULL, payload BYTEA NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

async fn effects(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn effects_of(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[derive(Debug)]
struct Boom;

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}

impl std::error::Error for Boom {}

/// Inserts one effect row, then fails the first `failures` calls (after writing: the rollback must
/// undo it), optionally sleeping inside the transaction to widen race windows.
#[derive(Default)]
struct Effect {
    failures: AtomicUsize,
    calls: AtomicUsize,
    sleep: Duration,
}

#[async_trait]
impl Handler<Postgres> for Effect {
    type Error = Boom;

    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &Incoming<'_>,
    ) -> Result<(), Boom> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO effects (message_id, payload) VALUES ($1, $2)")
            .bind(msg.id)
            .bind(msg.payload)
            .execute(&mut **tx)
            .await
            .map_err(|_| Boom)?;
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            Err(Boom)
        } else {
            Ok(())
        }
    }
}

fn unkeyed() -> Incoming<'static> {
    Incoming::new(Uuid::now_v7(), "orders", b"payload")
}

fn keyed(key: &'static str, seq: i64) -> Incoming<'static> {
    Incoming::new(Uuid::now_v7(), "orders", b"payload").keyed(key, seq)
}

fn consumer() -> String {
    format!("c-{}", Uuid::new_v4().simple())
}

async fn key_seq(pool: &PgPool, consumer: &str, key: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT seq FROM outbox_inbox_keys WHERE consumer = $1 AND key = $2")
        .bind(consumer)
        .bind(key)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn id_rows(pool: &PgPool, consumer: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_inbox_messages WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Counters by "name/consumer", recorded process-wide; tests read only their own consumer's.
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let consumer = key
            .labels()
            .find(|l| l.key() == "consumer")
            .map(|l| l.value().to_owned());
        let name = format!("{}/{}", key.name(), consumer.unwrap_or_default());
        let c = self.0.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(c)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn counter(name: &str, consumer: &str) -> u64 {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    let c = COUNTERS.get_or_init(|| {
        let c: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(c).expect("only this test binary sets a recorder");
        c
    });
    c.0.lock()
        .unwrap()
        .get(&format!("{name}/{consumer}"))
        .map_or(0, |v| v.load(Ordering::SeqCst))
}

/// Installs the recorder before anything is counted.
fn metrics_on() {
    counter("", "");
}

#[tokio::test]
async fn every_message_delivered_twice_has_its_effect_once() {
    metrics_on();
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Effect::default();
    let mut msgs: Vec<Incoming<'static>> = Vec::new();
    for seq in 1..=5 {
        for key in ["k1", "k2", "k3"] {
            msgs.push(keyed(key, seq));
        }
        msgs.push(unkeyed());
    }
    // Deliver each message, then its duplicate right away, then the whole stream again.
    for m in &msgs {
        assert_eq!(
            inbox.process(&pool, m, &handler).await.unwrap(),
            Outcome::Processed
        );
        assert_eq!(
            inbox.process(&pool, m, &handler).await.unwrap(),
            Outcome::Duplicate
        );
    }
    for m in &msgs {
        assert_eq!(
            inbox.process(&pool, m, &handler).await.unwrap(),
            Outcome::Duplicate
        );
    }
    assert_eq!(effects(&pool).await, msgs.len() as i64);
    for m in &msgs {
        assert_eq!(effects_of(&pool, m.id).await, 1);
    }
    assert_eq!(handler.calls.load(Ordering::SeqCst), msgs.len());
    // Keyed messages leave one row per key, unkeyed ones one row per message.
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_inbox_keys WHERE consumer = $1")
            .bind(&c)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(keys, 3);
    assert_eq!(key_seq(&pool, &c, "k2").await, Some(5));
    assert_eq!(id_rows(&pool, &c).await, 5);
    assert_eq!(
        counter("outbox_inbox_processed_total", &c),
        msgs.len() as u64
    );
    assert_eq!(
        counter("outbox_inbox_duplicates_total", &c),
        2 * msgs.len() as u64
    );
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
}

#[tokio::test]
async fn keyed_duplicates_are_told_by_seq_including_older_ones_with_new_ids() {
    let pool = pool().await;
    let inbox = Inbox::new(consumer());
    let handler = Effect::default();
    for seq in 1..=3 {
        assert_eq!(
            inbox
                .process(&pool, &keyed("k", seq), &handler)
                .await
                .unwrap(),
            Outcome::Processed
        );
    }
    // Redelivered with the same seq, or an older seq arriving out of order: even under a new id.
    for seq in [3, 2, 1] {
        assert_eq!(
            inbox
                .process(&pool, &keyed("k", seq), &handler)
                .await
                .unwrap(),
            Outcome::Duplicate
        );
    }
    assert_eq!(effects(&pool).await, 3);
    // Another key, and the same key for another consumer, are independent.
    assert_eq!(
        inbox
            .process(&pool, &keyed("other", 1), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    let other = Inbox::new(consumer());
    assert_eq!(
        other
            .process(&pool, &keyed("k", 1), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    assert_eq!(effects(&pool).await, 5);
}

#[tokio::test]
async fn a_gap_under_accept_is_processed_counted_and_moves_the_key_on() {
    metrics_on();
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    assert_eq!(inbox.clone().gap_policy(GapPolicy::Accept).consumer(), c);
    let handler = Effect::default();
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 1), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 4), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);
    assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
    // The skipped seqs count as seen.
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 2), &handler)
            .await
            .unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 5), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    // A key first seen above seq 1 has skipped its beginning.
    assert_eq!(
        inbox
            .process(&pool, &keyed("late", 7), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 2);
    assert_eq!(effects(&pool).await, 4);
}

#[tokio::test]
async fn a_gap_under_hold_commits_nothing_until_the_missing_message_came() {
    metrics_on();
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
    let handler = Effect::default();
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 1), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    let third = keyed("k", 3);
    for _ in 0..2 {
        let out = inbox.process(&pool, &third, &handler).await.unwrap();
        assert_eq!(out, Outcome::Held);
        assert!(!out.is_done());
    }
    assert_eq!(effects(&pool).await, 1);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 2);
    // A key first seen above seq 1 waits for its beginning too, leaving no row behind.
    assert_eq!(
        inbox
            .process(&pool, &keyed("new", 2), &handler)
            .await
            .unwrap(),
        Outcome::Held
    );
    assert_eq!(key_seq(&pool, &c, "new").await, None);

    // The missing message arrives: the held one goes through on its next delivery.
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 2), &handler)
            .await
            .unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        inbox.process(&pool, &third, &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        inbox.process(&pool, &third, &handler).await.unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(key_seq(&pool, &c, "k").await, Some(3));
    assert_eq!(effects(&pool).await, 3);
}

#[tokio::test]
async fn a_failing_handler_leaves_no_record_and_the_retry_applies_once() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    for msg in [unkeyed(), keyed("k", 1)] {
        let handler = Effect {
            failures: AtomicUsize::new(2),
            ..Effect::default()
        };
        for _ in 0..2 {
            let err = inbox.process(&pool, &msg, &handler).await.unwrap_err();
            assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
            assert!(err.is_retryable());
            // The handler's write and the dedup record were rolled back together.
            assert_eq!(effects_of(&pool, msg.id).await, 0);
            let recorded: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox_inbox_messages WHERE message_id = $1",
            )
            .bind(msg.id)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(recorded, 0);
            assert_eq!(key_seq(&pool, &c, "k").await, None);
        }
        assert_eq!(
            inbox.process(&pool, &msg, &handler).await.unwrap(),
            Outcome::Processed
        );
        assert_eq!(
            inbox.process(&pool, &msg, &handler).await.unwrap(),
            Outcome::Duplicate
        );
        assert_eq!(effects_of(&pool, msg.id).await, 1);
        assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    }
    assert_eq!(id_rows(&pool, &c).await, 1);
    assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
}

#[tokio::test]
async fn concurrent_deliveries_of_one_message_apply_it_once() {
    let pool = pool().await;
    let inbox = Inbox::new(consumer());
    // Sleeping inside the transaction keeps the first delivery uncommitted while the others arrive.
    let handler = Arc::new(Effect {
        sleep: Duration::from_millis(100),
        ..Effect::default()
    });
    // Unkeyed, a new key, a key that exists already.
    let seed = keyed("old", 1);
    assert_eq!(
        inbox.process(&pool, &seed, &*handler).await.unwrap(),
        Outcome::Processed
    );
    for msg in [unkeyed(), keyed("new", 1), keyed("old", 2)] {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (pool, inbox, handler, msg) =
                    (pool.clone(), inbox.clone(), handler.clone(), msg.clone());
                tokio::spawn(async move { inbox.process(&pool, &msg, &*handler).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(o) => outcomes.push(o),
                Err(e) => assert!(e.is_retryable(), "{e:?}"),
            }
        }
        assert_eq!(effects_of(&pool, msg.id).await, 1, "{msg:?}");
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Processed)
                .count(),
            1,
            "{outcomes:?}"
        );
        // Under READ COMMITTED the others wait and then see the committed record.
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Duplicate)
                .count(),
            7,
            "{outcomes:?}"
        );
    }
    assert_eq!(effects(&pool).await, 4);
}

#[tokio::test]
async fn cleanup_deletes_expired_unkeyed_records_in_batches_and_keeps_the_rest() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c).retention(Duration::from_secs(24 * 60 * 60));
    let other = Inbox::new(consumer());
    let handler = Effect::default();
    let old: Vec<_> = (0..7).map(|_| unkeyed()).collect();
    let recent: Vec<_> = (0..2).map(|_| unkeyed()).collect();
    for m in old.iter().chain(&recent) {
        inbox.process(&pool, m, &handler).await.unwrap();
    }
    inbox
        .process(&pool, &keyed("k", 1), &handler)
        .await
        .unwrap();
    other.process(&pool, &old[0], &handler).await.unwrap();
    let ids: Vec<Uuid> = old.iter().map(|m| m.id).collect();
    sqlx::query("UPDATE outbox_inbox_messages SET processed_at = now() - interval '2 days' WHERE message_id = ANY($1)")
        .bind(&ids)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_inbox_keys SET updated_at = now() - interval '2 days'")
        .execute(&pool)
        .await
        .unwrap();

    // 7 expired rows by batches of 3: 3 + 3 + 1.
    assert_eq!(inbox.cleanup(&pool, 3).await.unwrap(), 7);
    assert_eq!(inbox.cleanup(&pool, 3).await.unwrap(), 0);
    assert_eq!(id_rows(&pool, &c).await, 2);
    for m in &recent {
        assert_eq!(
            inbox.process(&pool, m, &handler).await.unwrap(),
            Outcome::Duplicate
        );
    }
    // Past the window an unkeyed duplicate is no longer recognised; a keyed one always is.
    assert_eq!(
        inbox.process(&pool, &old[1], &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        inbox
            .process(&pool, &keyed("k", 1), &handler)
            .await
            .unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
    // Another consumer's rows are its own business (its window is 7 days).
    assert_eq!(id_rows(&pool, other.consumer()).await, 1);
    assert_eq!(other.cleanup(&pool, 100).await.unwrap(), 0);
}

#[test]
fn incoming_is_parsed_from_the_framework_headers() {
    let id = Uuid::now_v7().to_string();
    let headers = [
        (
            "traceparent",
            &b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..],
        ),
        ("outbox-id", id.as_bytes()),
        ("outbox-key", b"order-42"),
        ("outbox-seq", b"17"),
        ("content-type", b"application/json"),
    ];
    let msg = Incoming::from_headers("orders", b"{}", headers).unwrap();
    assert_eq!(msg.id.to_string(), id);
    assert_eq!((msg.key, msg.seq), (Some("order-42"), Some(17)));
    assert_eq!((msg.topic, msg.payload), ("orders", &b"{}"[..]));
    assert_eq!(msg.headers.len(), 5);
    assert_eq!(
        msg.header_value("content-type"),
        Some(&b"application/json"[..])
    );

    let unkeyed = Incoming::from_headers("orders", b"", [("outbox-id", id.as_bytes())]).unwrap();
    assert_eq!((unkeyed.key, unkeyed.seq), (None, None));
}

#[test]
fn incoming_without_a_usable_id_is_a_permanent_error() {
    let none: [(&str, &[u8]); 1] = [("outbox-key", b"k")];
    let err = Incoming::from_headers("orders", b"", none).unwrap_err();
    assert!(
        matches!(err, InboxError::MissingHeader("outbox-id")),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("outbox-id"), "{err}");

    let id = Uuid::now_v7().to_string();
    let bad: [&[(&str, &[u8])]; 6] = [
        &[("outbox-id", b"not-a-uuid")],
        &[("outbox-id", b"")],
        &[("outbox-id", b"\xff\xfe")],
        &[("outbox-id", id.as_bytes()), ("outbox-seq", b"seven")],
        &[("outbox-id", id.as_bytes()), ("outbox-seq", b"0")],
        &[("outbox-id", id.as_bytes()), ("outbox-key", b"")],
    ];
    for headers in bad {
        let err = Incoming::from_headers("orders", b"", headers.iter().copied()).unwrap_err();
        assert!(
            matches!(err, InboxError::MalformedHeader { .. }),
            "{headers:?}: {err:?}"
        );
        assert!(!err.is_retryable());
    }
}
