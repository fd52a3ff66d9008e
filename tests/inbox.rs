//! The inbox on a real PostgreSQL: every redelivery is recognised, the handler's effect commits once
//! with the dedup record, gaps follow the policy (a skipped message arriving late is processed once),
//! concurrent deliveries run the effect once.

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

    async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), Boom> {
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

/// The open gaps of (consumer, key), lowest first.
async fn gaps(pool: &PgPool, consumer: &str, key: &str) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT from_seq, to_seq FROM outbox_inbox_gaps WHERE consumer = $1 AND key = $2 ORDER BY from_seq")
        .bind(consumer)
        .bind(key)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The key's lower bound of its open gaps (None: no gap).
async fn gap_from(pool: &PgPool, consumer: &str, key: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT gap_from FROM outbox_inbox_keys WHERE consumer = $1 AND key = $2")
        .bind(consumer)
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Delivers a new message (new id) of `key` with `seq`.
async fn deliver(inbox: &Inbox, pool: &PgPool, handler: &Effect, key: &'static str, seq: i64) -> Outcome {
    inbox.process(pool, &keyed(key, seq), handler).await.unwrap()
}

/// Counters by "name/consumer", recorded process-wide; tests read only their own consumer's.
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

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

    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
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
        assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Processed);
        assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Duplicate);
    }
    for m in &msgs {
        assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Duplicate);
    }
    assert_eq!(effects(&pool).await, msgs.len() as i64);
    for m in &msgs {
        assert_eq!(effects_of(&pool, m.id).await, 1);
    }
    assert_eq!(handler.calls.load(Ordering::SeqCst), msgs.len());
    // Keyed messages leave one row per key, unkeyed ones one row per message.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_inbox_keys WHERE consumer = $1")
        .bind(&c)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(keys, 3);
    assert_eq!(key_seq(&pool, &c, "k2").await, Some(5));
    assert_eq!(id_rows(&pool, &c).await, 5);
    assert_eq!(counter("outbox_inbox_processed_total", &c), msgs.len() as u64);
    assert_eq!(counter("outbox_inbox_duplicates_total", &c), 2 * msgs.len() as u64);
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
}

#[tokio::test]
async fn keyed_duplicates_are_told_by_seq_including_older_ones_with_new_ids() {
    let pool = pool().await;
    let inbox = Inbox::new(consumer());
    let handler = Effect::default();
    for seq in 1..=3 {
        assert_eq!(
            inbox.process(&pool, &keyed("k", seq), &handler).await.unwrap(),
            Outcome::Processed
        );
    }
    // Redelivered with the same seq, or an older seq arriving out of order: even under a new id.
    for seq in [3, 2, 1] {
        assert_eq!(
            inbox.process(&pool, &keyed("k", seq), &handler).await.unwrap(),
            Outcome::Duplicate
        );
    }
    assert_eq!(effects(&pool).await, 3);
    // Another key, and the same key for another consumer, are independent.
    assert_eq!(
        inbox.process(&pool, &keyed("other", 1), &handler).await.unwrap(),
        Outcome::Processed
    );
    let other = Inbox::new(consumer());
    assert_eq!(
        other.process(&pool, &keyed("k", 1), &handler).await.unwrap(),
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
        inbox.process(&pool, &keyed("k", 1), &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        inbox.process(&pool, &keyed("k", 4), &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);
    assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
    // The skipped seqs are recorded as an open gap.
    assert_eq!(gaps(&pool, &c, "k").await, [(2, 3)]);
    assert_eq!(gap_from(&pool, &c, "k").await, Some(2));
    assert_eq!(
        inbox.process(&pool, &keyed("k", 5), &handler).await.unwrap(),
        Outcome::Processed
    );
    // A key first seen above seq 1 has skipped its beginning.
    assert_eq!(
        inbox.process(&pool, &keyed("late", 7), &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 2);
    assert_eq!(gaps(&pool, &c, "late").await, [(1, 6)]);
    assert_eq!(effects(&pool).await, 4);
}

#[tokio::test]
async fn a_skipped_message_arriving_late_is_processed_once_and_only_it() {
    metrics_on();
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Effect::default();
    for seq in [1, 2] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    // 3 timed out at the producer ("possibly persisted") while 4 went through; 5 follows.
    for seq in [4, 5] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, &c, "k").await, [(3, 3)]);
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);

    // The relay sends 3 again: it is new, its effect applies.
    let late = keyed("k", 3);
    assert_eq!(inbox.process(&pool, &late, &handler).await.unwrap(), Outcome::Processed);
    assert_eq!(effects_of(&pool, late.id).await, 1);
    assert_eq!(gaps(&pool, &c, "k").await, []);
    assert_eq!(gap_from(&pool, &c, "k").await, None);
    assert_eq!(key_seq(&pool, &c, "k").await, Some(5));
    assert_eq!(counter("outbox_inbox_gap_fills_total", &c), 1);
    assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);

    // Delivered again (same id, or a new one): a duplicate. So is anything below or at the top.
    assert_eq!(inbox.process(&pool, &late, &handler).await.unwrap(), Outcome::Duplicate);
    for seq in [3, 1, 2, 4, 5] {
        assert_eq!(
            deliver(&inbox, &pool, &handler, "k", seq).await,
            Outcome::Duplicate,
            "seq {seq}"
        );
    }
    assert_eq!(effects_of(&pool, late.id).await, 1);
    assert_eq!(effects(&pool).await, 5);
    assert_eq!(counter("outbox_inbox_processed_total", &c), 5);
    assert_eq!(counter("outbox_inbox_duplicates_total", &c), 6);
}

#[tokio::test]
async fn only_seqs_inside_a_gap_are_new_below_the_highest() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Effect::default();
    // Two gaps: 4..=5 and 8..=9.
    for seq in [1, 2, 3, 6, 7, 10] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, &c, "k").await, [(4, 5), (8, 9)]);
    assert_eq!(gap_from(&pool, &c, "k").await, Some(4));
    // Below the lowest gap, between the gaps, at the top: duplicates, and the gaps are untouched.
    for seq in [1, 3, 6, 7, 10] {
        assert_eq!(
            deliver(&inbox, &pool, &handler, "k", seq).await,
            Outcome::Duplicate,
            "seq {seq}"
        );
    }
    assert_eq!(gaps(&pool, &c, "k").await, [(4, 5), (8, 9)]);
    // Filling the lower gap leaves the upper one, and gap_from follows.
    for seq in [5, 4] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, &c, "k").await, [(8, 9)]);
    assert_eq!(gap_from(&pool, &c, "k").await, Some(8));
    for seq in [4, 5, 7] {
        assert_eq!(
            deliver(&inbox, &pool, &handler, "k", seq).await,
            Outcome::Duplicate,
            "seq {seq}"
        );
    }
    // Above the highest is still the plain path; another key is not concerned.
    assert_eq!(deliver(&inbox, &pool, &handler, "k", 11).await, Outcome::Processed);
    assert_eq!(deliver(&inbox, &pool, &handler, "other", 1).await, Outcome::Processed);
    assert_eq!(deliver(&inbox, &pool, &handler, "other", 1).await, Outcome::Duplicate);
    assert_eq!(gap_from(&pool, &c, "other").await, None);
    assert_eq!(effects(&pool).await, 10);
}

#[tokio::test]
async fn a_gap_of_several_seqs_is_filled_in_any_order() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Effect::default();
    let orders: [(&'static str, [i64; 5]); 5] = [
        ("ascending", [2, 3, 4, 5, 6]),
        ("descending", [6, 5, 4, 3, 2]),
        ("middle-first", [4, 2, 6, 3, 5]),
        ("edges-last", [3, 5, 4, 6, 2]),
        ("shuffled", [5, 2, 3, 6, 4]),
    ];
    for (key, order) in orders {
        assert_eq!(deliver(&inbox, &pool, &handler, key, 1).await, Outcome::Processed);
        assert_eq!(deliver(&inbox, &pool, &handler, key, 7).await, Outcome::Processed);
        assert_eq!(gaps(&pool, &c, key).await, [(2, 6)]);
        let mut missing: Vec<i64> = (2..=6).collect();
        for seq in order {
            assert_eq!(
                deliver(&inbox, &pool, &handler, key, seq).await,
                Outcome::Processed,
                "{key} {seq}"
            );
            assert_eq!(
                deliver(&inbox, &pool, &handler, key, seq).await,
                Outcome::Duplicate,
                "{key} {seq}"
            );
            missing.retain(|s| *s != seq);
            // The open ranges are exactly the runs of seqs still missing.
            let mut runs: Vec<(i64, i64)> = Vec::new();
            for &s in &missing {
                match runs.last_mut() {
                    Some((_, to)) if *to + 1 == s => *to = s,
                    _ => runs.push((s, s)),
                }
            }
            assert_eq!(gaps(&pool, &c, key).await, runs, "{key} after {seq}");
            assert_eq!(
                gap_from(&pool, &c, key).await,
                runs.first().map(|r| r.0),
                "{key} after {seq}"
            );
        }
        assert_eq!(key_seq(&pool, &c, key).await, Some(7));
        for seq in 1..=7 {
            assert_eq!(
                deliver(&inbox, &pool, &handler, key, seq).await,
                Outcome::Duplicate,
                "{key} {seq}"
            );
        }
    }
    assert_eq!(effects(&pool).await, 5 * 7);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 5 * 7);
}

#[tokio::test]
async fn a_key_first_seen_above_1_can_still_get_its_beginning() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Effect::default();
    assert_eq!(deliver(&inbox, &pool, &handler, "k", 3).await, Outcome::Processed);
    assert_eq!(gaps(&pool, &c, "k").await, [(1, 2)]);
    assert_eq!(gap_from(&pool, &c, "k").await, Some(1));
    for seq in [1, 2] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Duplicate);
    }
    assert_eq!(gaps(&pool, &c, "k").await, []);
    assert_eq!(effects(&pool).await, 3);
}

#[tokio::test]
async fn a_failing_handler_on_a_late_message_keeps_the_gap_open() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Effect::default();
    for seq in [1, 5] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    let failing = Effect {
        failures: AtomicUsize::new(1),
        ..Effect::default()
    };
    let late = keyed("k", 3);
    let err = inbox.process(&pool, &late, &failing).await.unwrap_err();
    assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
    // Rolled back with the handler's writes: the gap is whole, the retry applies it once.
    assert_eq!(gaps(&pool, &c, "k").await, [(2, 4)]);
    assert_eq!(effects_of(&pool, late.id).await, 0);
    assert_eq!(inbox.process(&pool, &late, &failing).await.unwrap(), Outcome::Processed);
    assert_eq!(inbox.process(&pool, &late, &failing).await.unwrap(), Outcome::Duplicate);
    assert_eq!(effects_of(&pool, late.id).await, 1);
    assert_eq!(gaps(&pool, &c, "k").await, [(2, 2), (4, 4)]);
}

#[tokio::test]
async fn a_gap_under_hold_commits_nothing_until_the_missing_message_came() {
    metrics_on();
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
    let handler = Effect::default();
    assert_eq!(
        inbox.process(&pool, &keyed("k", 1), &handler).await.unwrap(),
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
    // Held: the gap was not recorded either.
    assert_eq!(gaps(&pool, &c, "k").await, []);
    assert_eq!(gap_from(&pool, &c, "k").await, None);
    // A key first seen above seq 1 waits for its beginning too, leaving no row behind.
    assert_eq!(
        inbox.process(&pool, &keyed("new", 2), &handler).await.unwrap(),
        Outcome::Held
    );
    assert_eq!(key_seq(&pool, &c, "new").await, None);

    // The missing message arrives: the held one goes through on its next delivery.
    assert_eq!(
        inbox.process(&pool, &keyed("k", 2), &handler).await.unwrap(),
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
            let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_inbox_messages WHERE message_id = $1")
                .bind(msg.id)
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(recorded, 0);
            assert_eq!(key_seq(&pool, &c, "k").await, None);
        }
        assert_eq!(inbox.process(&pool, &msg, &handler).await.unwrap(), Outcome::Processed);
        assert_eq!(inbox.process(&pool, &msg, &handler).await.unwrap(), Outcome::Duplicate);
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
                let (pool, inbox, handler, msg) = (pool.clone(), inbox.clone(), handler.clone(), msg.clone());
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
            outcomes.iter().filter(|o| **o == Outcome::Processed).count(),
            1,
            "{outcomes:?}"
        );
        // Under READ COMMITTED the others wait and then see the committed record.
        assert_eq!(
            outcomes.iter().filter(|o| **o == Outcome::Duplicate).count(),
            7,
            "{outcomes:?}"
        );
    }
    assert_eq!(effects(&pool).await, 4);
}

#[tokio::test]
async fn concurrent_deliveries_of_a_skipped_message_apply_it_once() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Arc::new(Effect {
        sleep: Duration::from_millis(100),
        ..Effect::default()
    });
    // Gaps 2..=2 (filled whole), 4..=8 (split in the middle), 10..=11 (cut at its start).
    for seq in [1, 3, 9, 12] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, &c, "k").await, [(2, 2), (4, 8), (10, 11)]);
    for seq in [2, 6, 10] {
        let msg = keyed("k", seq);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (pool, inbox, handler, msg) = (pool.clone(), inbox.clone(), handler.clone(), msg.clone());
                tokio::spawn(async move { inbox.process(&pool, &msg, &*handler).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().unwrap());
        }
        let processed = outcomes.iter().filter(|o| **o == Outcome::Processed).count();
        let duplicate = outcomes.iter().filter(|o| **o == Outcome::Duplicate).count();
        assert_eq!((processed, duplicate), (1, 7), "seq {seq}: {outcomes:?}");
        assert_eq!(effects_of(&pool, msg.id).await, 1, "seq {seq}");
    }
    assert_eq!(gaps(&pool, &c, "k").await, [(4, 5), (7, 8), (11, 11)]);
    assert_eq!(gap_from(&pool, &c, "k").await, Some(4));
    assert_eq!(effects(&pool).await, 4 + 3);
}

#[tokio::test]
async fn a_gap_and_its_skipped_message_delivered_concurrently_both_apply() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c);
    let handler = Arc::new(Effect {
        sleep: Duration::from_millis(100),
        ..Effect::default()
    });
    // 5 and 3 race on the key row: whichever goes first, both apply, and 2 and 4 stay missing. Each
    // seq is delivered twice; the deliveries start 5 ms apart in the order given, or all at once.
    for (order, stagger) in [([5, 3, 5, 3], 5), ([3, 5, 3, 5], 5), ([5, 3, 3, 5], 0)] {
        let key: &'static str = Box::leak(format!("k-{}", Uuid::new_v4().simple()).into_boxed_str());
        assert_eq!(deliver(&inbox, &pool, &handler, key, 1).await, Outcome::Processed);
        let tasks: Vec<_> = order
            .into_iter()
            .enumerate()
            .map(|(i, seq)| {
                let (pool, inbox, handler) = (pool.clone(), inbox.clone(), handler.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(stagger * i as u64)).await;
                    inbox.process(&pool, &keyed(key, seq), &*handler).await.unwrap()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        // The first delivery of each seq processes it; the second is a duplicate.
        let processed = outcomes.iter().filter(|o| **o == Outcome::Processed).count();
        assert_eq!(processed, 2, "{outcomes:?}");
        assert_eq!(key_seq(&pool, &c, key).await, Some(5));
        assert_eq!(gaps(&pool, &c, key).await, [(2, 2), (4, 4)]);
        for seq in [2, 4] {
            assert_eq!(deliver(&inbox, &pool, &handler, key, seq).await, Outcome::Processed);
        }
        assert_eq!(gaps(&pool, &c, key).await, []);
    }
}

#[tokio::test]
async fn cleanup_deletes_expired_gaps_and_a_skipped_message_later_than_that_is_a_duplicate() {
    let pool = pool().await;
    let c = consumer();
    let inbox = Inbox::new(&c).retention(Duration::from_secs(24 * 60 * 60));
    let handler = Effect::default();
    for (key, seqs) in [("old", [1, 5]), ("split", [1, 10]), ("recent", [1, 4])] {
        for seq in seqs {
            assert_eq!(deliver(&inbox, &pool, &handler, key, seq).await, Outcome::Processed);
        }
    }
    // "split" is split by a late message before its gap gets old: both parts keep its age.
    assert_eq!(deliver(&inbox, &pool, &handler, "split", 5).await, Outcome::Processed);
    assert_eq!(gaps(&pool, &c, "split").await, [(2, 4), (6, 9)]);
    sqlx::query("UPDATE outbox_inbox_gaps SET created_at = now() - interval '2 days' WHERE consumer = $1 AND key IN ('old', 'split')")
        .bind(&c)
        .execute(&pool)
        .await
        .unwrap();

    // 3 expired gaps by batches of 2: 2 + 1. No unkeyed records to delete.
    assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 3);
    assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 0);
    assert_eq!(gaps(&pool, &c, "old").await, []);
    assert_eq!(gaps(&pool, &c, "recent").await, [(2, 3)]);
    // Past the window a skipped message is taken for a duplicate; the key's gap_from, left behind
    // by the cleanup, is repaired on the way.
    assert_eq!(gap_from(&pool, &c, "old").await, Some(2));
    assert_eq!(deliver(&inbox, &pool, &handler, "old", 3).await, Outcome::Duplicate);
    assert_eq!(gap_from(&pool, &c, "old").await, None);
    assert_eq!(deliver(&inbox, &pool, &handler, "old", 3).await, Outcome::Duplicate);
    // Within the window it is processed.
    assert_eq!(deliver(&inbox, &pool, &handler, "recent", 3).await, Outcome::Processed);
    assert_eq!(gaps(&pool, &c, "recent").await, [(2, 2)]);
    assert_eq!(effects(&pool).await, 2 + 3 + 2 + 1);
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
    inbox.process(&pool, &keyed("k", 1), &handler).await.unwrap();
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
        assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Duplicate);
    }
    // Past the window an unkeyed duplicate is no longer recognised; a keyed one always is.
    assert_eq!(
        inbox.process(&pool, &old[1], &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        inbox.process(&pool, &keyed("k", 1), &handler).await.unwrap(),
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
    assert_eq!(msg.header_value("content-type"), Some(&b"application/json"[..]));

    let unkeyed = Incoming::from_headers("orders", b"", [("outbox-id", id.as_bytes())]).unwrap();
    assert_eq!((unkeyed.key, unkeyed.seq), (None, None));
}

#[test]
fn incoming_without_a_usable_id_is_a_permanent_error() {
    let none: [(&str, &[u8]); 1] = [("outbox-key", b"k")];
    let err = Incoming::from_headers("orders", b"", none).unwrap_err();
    assert!(matches!(err, InboxError::MissingHeader("outbox-id")), "{err:?}");
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
