//! The conformance suite every inbox backend passes. `inbox_suite!(Db, fresh)` expands to one
//! `#[tokio::test]` per scenario, where `fresh` is a future of a new, migrated `Pool<Db>`; each
//! scenario is written once, for every database. The crate that expands it needs `outbox-inbox`
//! (with the database's feature), `metrics`, `async-trait`, `sqlx`, `tokio` and `uuid`.
//!
//! The suite's own statements are portable SQL with the values inlined (generated consumer names,
//! test keys and ids: nothing to quote), on a business table `effects` created by the suite. What
//! cannot be written portably, picking a key's rows in the inbox tables and moving a time back, comes
//! from the database's [`Dialect`]: a new backend implements it to get the suite.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Once, OnceLock};

/// The SQL the suite cannot state once for all databases.
pub trait Dialect {
    /// A condition selecting the rows of `key` (a test key, no quotes in it) in
    /// `outbox_inbox_keys` and `outbox_inbox_gaps`.
    fn key_is(key: &str) -> String;
    /// An expression: the time in `column` (a time column of the inbox tables) two days earlier.
    fn two_days_before(column: &str) -> String;
}

impl Dialect for sqlx::Postgres {
    fn key_is(key: &str) -> String {
        format!("key = '{key}'")
    }

    fn two_days_before(column: &str) -> String {
        format!("{column} - interval '2 days'")
    }
}

// Keys are found by their SHA-256; times are DATETIME(6).
impl Dialect for sqlx::MySql {
    fn key_is(key: &str) -> String {
        format!("key_hash = UNHEX(SHA2('{key}', 256))")
    }

    fn two_days_before(column: &str) -> String {
        format!("{column} - INTERVAL 2 DAY")
    }
}

// Times are microseconds since the Unix epoch.
impl Dialect for sqlx::Sqlite {
    fn key_is(key: &str) -> String {
        format!("key = '{key}'")
    }

    fn two_days_before(column: &str) -> String {
        format!("{column} - 2 * 86400 * 1000000")
    }
}

/// A consumer name no other test uses.
pub fn consumer() -> String {
    format!("c-{}", uuid::Uuid::new_v4().simple())
}

/// The runs of consecutive seqs in `missing` (ascending), as `(from, to)` ranges.
pub fn runs(missing: &[i64]) -> Vec<(i64, i64)> {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &s in missing {
        match runs.last_mut() {
            Some((_, to)) if *to + 1 == s => *to = s,
            _ => runs.push((s, s)),
        }
    }
    runs
}

/// The test handler's failure.
#[derive(Debug)]
pub struct Boom;

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}

impl std::error::Error for Boom {}

/// Set once the suite's metrics recorder is installed: the recorder is process-wide, and every
/// expansion of the suite in a test binary shares it (and the counters below).
pub static RECORDER: Once = Once::new();

fn counters() -> &'static Mutex<HashMap<String, Arc<AtomicU64>>> {
    static COUNTERS: OnceLock<Mutex<HashMap<String, Arc<AtomicU64>>>> = OnceLock::new();
    COUNTERS.get_or_init(Default::default)
}

/// The cell of counter `name` for `consumer`, created at 0.
pub fn counter_cell(name: &str, consumer: &str) -> Arc<AtomicU64> {
    counters()
        .lock()
        .unwrap()
        .entry(format!("{name}/{consumer}"))
        .or_default()
        .clone()
}

/// Counter `name` of `consumer` as counted so far.
pub fn counter_value(name: &str, consumer: &str) -> u64 {
    counter_cell(name, consumer).load(std::sync::atomic::Ordering::SeqCst)
}

#[macro_export]
macro_rules! inbox_suite {
    ($db:ty, $fresh:expr) => {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;

        use async_trait::async_trait;
        use outbox_inbox::{GapPolicy, Handler, Inbox, InboxError, Incoming, Outcome};
        use uuid::Uuid;
        use $crate::inbox_suite::{consumer, runs, Boom, Dialect};

        type Pool = sqlx::Pool<$db>;

        /// A new migrated database with the business table the test handler writes to: one row per
        /// time a message's effect committed.
        async fn pool() -> Pool {
            let pool: Pool = $fresh.await;
            sqlx::raw_sql("CREATE TABLE effects (message_id VARCHAR(36) NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();
            pool
        }

        async fn count(pool: &Pool, sql: String) -> i64 {
            sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap()
        }

        async fn effects(pool: &Pool) -> i64 {
            count(pool, "SELECT COUNT(*) FROM effects".into()).await
        }

        async fn effects_of(pool: &Pool, id: Uuid) -> i64 {
            count(
                pool,
                format!("SELECT COUNT(*) FROM effects WHERE message_id = '{id}'"),
            )
            .await
        }

        /// The key's highest seq (None: the key has no row).
        async fn key_seq(pool: &Pool, consumer: &str, key: &str) -> Option<i64> {
            let key = <$db as Dialect>::key_is(key);
            sqlx::query_scalar(&format!(
                "SELECT seq FROM outbox_inbox_keys WHERE consumer = '{consumer}' AND {key}"
            ))
            .fetch_optional(pool)
            .await
            .unwrap()
        }

        /// The key's lower bound of its open gaps (None: no gap).
        async fn gap_from(pool: &Pool, consumer: &str, key: &str) -> Option<i64> {
            let key = <$db as Dialect>::key_is(key);
            sqlx::query_scalar(&format!(
                "SELECT gap_from FROM outbox_inbox_keys WHERE consumer = '{consumer}' AND {key}"
            ))
            .fetch_one(pool)
            .await
            .unwrap()
        }

        /// The open gaps of (consumer, key), lowest first.
        async fn gaps(pool: &Pool, consumer: &str, key: &str) -> Vec<(i64, i64)> {
            let key = <$db as Dialect>::key_is(key);
            sqlx::query_as(&format!(
                "SELECT from_seq, to_seq FROM outbox_inbox_gaps WHERE consumer = '{consumer}' AND {key} \
                 ORDER BY from_seq"
            ))
            .fetch_all(pool)
            .await
            .unwrap()
        }

        async fn key_rows(pool: &Pool, consumer: &str) -> i64 {
            count(
                pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_keys WHERE consumer = '{consumer}'"),
            )
            .await
        }

        async fn id_rows(pool: &Pool, consumer: &str) -> i64 {
            count(
                pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_messages WHERE consumer = '{consumer}'"),
            )
            .await
        }

        /// Moves `column` of every row of `table` (matching `filter`) two days back.
        async fn age(pool: &Pool, table: &str, column: &str, filter: &str) {
            let earlier = <$db as Dialect>::two_days_before(column);
            sqlx::raw_sql(&format!("UPDATE {table} SET {column} = {earlier} WHERE {filter}"))
                .execute(pool)
                .await
                .unwrap();
        }

        /// Inserts one effect row, then fails the first `failures` calls (after writing: the rollback
        /// must undo it), optionally sleeping inside the transaction to widen race windows.
        #[derive(Default)]
        struct Effect {
            failures: AtomicUsize,
            calls: AtomicUsize,
            sleep: Duration,
        }

        #[async_trait]
        impl Handler<$db> for Effect {
            type Error = Boom;

            async fn handle(&self, tx: &mut sqlx::Transaction<'_, $db>, msg: &Incoming<'_>) -> Result<(), Boom> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let insert = format!("INSERT INTO effects (message_id) VALUES ('{}')", msg.id);
                sqlx::query(&insert).execute(&mut **tx).await.map_err(|_| Boom)?;
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

        /// Delivers a new message (new id) of `key` with `seq`.
        async fn deliver(inbox: &Inbox, pool: &Pool, handler: &Effect, key: &'static str, seq: i64) -> Outcome {
            inbox.process(pool, &keyed(key, seq), handler).await.unwrap()
        }

        /// Delivers `msg` from 8 tasks at once; returns their outcomes.
        async fn deliver_concurrently(
            inbox: &Inbox,
            pool: &Pool,
            handler: &Arc<Effect>,
            msg: &Incoming<'static>,
        ) -> Vec<Outcome> {
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
            outcomes
        }

        fn tally(outcomes: &[Outcome]) -> (usize, usize) {
            let processed = outcomes.iter().filter(|o| **o == Outcome::Processed).count();
            let duplicate = outcomes.iter().filter(|o| **o == Outcome::Duplicate).count();
            (processed, duplicate)
        }

        /// The suite's metrics recorder: counters by "name/consumer", shared by every expansion of the
        /// suite in the test binary; tests read only their own consumer's.
        struct Counters;

        impl metrics::Recorder for Counters {
            fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
            fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
            fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

            fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
                let consumer = key
                    .labels()
                    .find(|l| l.key() == "consumer")
                    .map(|l| l.value().to_owned());
                let cell = $crate::inbox_suite::counter_cell(key.name(), &consumer.unwrap_or_default());
                metrics::Counter::from_arc(cell)
            }

            fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
                metrics::Gauge::noop()
            }

            fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
                metrics::Histogram::noop()
            }
        }

        /// Installs the recorder before anything is counted (call it first in a test that counts).
        fn metrics_on() {
            $crate::inbox_suite::RECORDER.call_once(|| {
                metrics::set_global_recorder(Counters).expect("only the inbox suite sets a recorder");
            });
        }

        fn counter(name: &str, consumer: &str) -> u64 {
            $crate::inbox_suite::counter_value(name, consumer)
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
            assert_eq!(key_rows(&pool, &c).await, 3);
            assert_eq!(key_seq(&pool, &c, "k2").await, Some(5));
            assert_eq!(id_rows(&pool, &c).await, 5);
            assert_eq!(counter("outbox_inbox_processed_total", &c), msgs.len() as u64);
            assert_eq!(
                counter("outbox_inbox_duplicates_total", &c),
                2 * msgs.len() as u64
            );
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
        }

        #[tokio::test]
        async fn one_connection_serves_every_kind_of_delivery_in_a_row() {
            // A backend that answers through session state (MySQL: LAST_INSERT_ID) must not read a
            // previous delivery's answer: on one connection, every kind follows every other kind.
            let pool = pool().await;
            let one: Pool = sqlx::pool::PoolOptions::new()
                .max_connections(1)
                .connect_with((*pool.connect_options()).clone())
                .await
                .unwrap();
            let c = consumer();
            let inbox = Inbox::new(&c);
            let handler = Effect::default();
            let first = unkeyed();
            let steps: Vec<(Incoming<'static>, Outcome)> = vec![
                (first.clone(), Outcome::Processed),
                (first.clone(), Outcome::Duplicate),
                (unkeyed(), Outcome::Processed),
                (keyed("k", 1), Outcome::Processed),
                (keyed("k", 1), Outcome::Duplicate),
                (keyed("j", 1), Outcome::Processed),
                (keyed("k", 2), Outcome::Processed),
                (keyed("k", 5), Outcome::Processed),
                (keyed("k", 2), Outcome::Duplicate),
                (keyed("k", 3), Outcome::Processed),
                (keyed("m", 1), Outcome::Processed),
                (keyed("k", 3), Outcome::Duplicate),
                (unkeyed(), Outcome::Processed),
                (keyed("k", 4), Outcome::Processed),
                (first.clone(), Outcome::Duplicate),
                (keyed("n", 2), Outcome::Processed),
                (keyed("k", 6), Outcome::Processed),
            ];
            for (i, (msg, expected)) in steps.iter().enumerate() {
                assert_eq!(
                    inbox.process(&one, msg, &handler).await.unwrap(),
                    *expected,
                    "step {i}: {msg:?}"
                );
            }
            assert_eq!(key_seq(&pool, &c, "k").await, Some(6));
            assert_eq!(gaps(&pool, &c, "k").await, []);
            assert_eq!(gaps(&pool, &c, "n").await, [(1, 1)]);
            assert_eq!(effects(&pool).await, 12);
        }

        #[tokio::test]
        async fn keyed_duplicates_are_told_by_seq_including_older_ones_with_new_ids() {
            let pool = pool().await;
            let inbox = Inbox::new(consumer());
            let handler = Effect::default();
            for seq in 1..=3 {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
            }
            // Redelivered with the same seq, or an older seq arriving out of order: even under a new id.
            for seq in [3, 2, 1] {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Duplicate
                );
            }
            assert_eq!(effects(&pool).await, 3);
            // Another key, and the same key for another consumer, are independent.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "other", 1).await,
                Outcome::Processed
            );
            let other = Inbox::new(consumer());
            assert_eq!(deliver(&other, &pool, &handler, "k", 1).await, Outcome::Processed);
            assert_eq!(effects(&pool).await, 5);
        }

        #[tokio::test]
        async fn keys_and_consumers_are_compared_byte_for_byte() {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c);
            let handler = Effect::default();
            // Case, trailing spaces and accents make different keys (no collation), and a key of any
            // length is a key.
            let long: &'static str = Box::leak("k".repeat(10_000).into_boxed_str());
            let keys = ["k", "K", "k ", "é", "e", long, "ключ"];
            for key in keys {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, key, 1).await,
                    Outcome::Processed,
                    "{key:?}"
                );
            }
            for key in keys {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, key, 1).await,
                    Outcome::Duplicate,
                    "{key:?}"
                );
            }
            assert_eq!(key_rows(&pool, &c).await, keys.len() as i64);
            // Their gaps are found again.
            for key in [long, "ключ"] {
                assert_eq!(deliver(&inbox, &pool, &handler, key, 3).await, Outcome::Processed);
                assert_eq!(deliver(&inbox, &pool, &handler, key, 2).await, Outcome::Processed);
                assert_eq!(deliver(&inbox, &pool, &handler, key, 2).await, Outcome::Duplicate);
            }
            // Consumer names too.
            let upper = Inbox::new(c.to_uppercase());
            let spaced = Inbox::new(format!("{c} "));
            for other in [&upper, &spaced] {
                assert_eq!(deliver(other, &pool, &handler, "k", 1).await, Outcome::Processed);
            }
            let msg = unkeyed();
            for other in [&inbox, &upper, &spaced] {
                assert_eq!(
                    other.process(&pool, &msg, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }
            assert_eq!(effects(&pool).await, keys.len() as i64 + 2 * 2 + 2 + 3);
        }

        #[tokio::test]
        async fn a_gap_under_accept_is_processed_counted_and_moves_the_key_on() {
            metrics_on();
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c);
            assert_eq!(inbox.clone().gap_policy(GapPolicy::Accept).consumer(), c);
            let handler = Effect::default();
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Processed);
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 4).await, Outcome::Processed);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
            // The skipped seqs are recorded as an open gap.
            assert_eq!(gaps(&pool, &c, "k").await, [(2, 3)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(2));
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 5).await, Outcome::Processed);
            // A key first seen above seq 1 has skipped its beginning.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "late", 7).await,
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
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
            }
            // 3 timed out at the producer ("possibly persisted") while 4 went through; 5 follows.
            for seq in [4, 5] {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
            }
            assert_eq!(gaps(&pool, &c, "k").await, [(3, 3)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(3));
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);

            // The relay sends 3 again: it is new, its effect applies.
            let late = keyed("k", 3);
            assert_eq!(
                inbox.process(&pool, &late, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(effects_of(&pool, late.id).await, 1);
            assert_eq!(gaps(&pool, &c, "k").await, []);
            assert_eq!(gap_from(&pool, &c, "k").await, None);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(5));
            assert_eq!(counter("outbox_inbox_gap_fills_total", &c), 1);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);

            // Delivered again (same id, or a new one): a duplicate. So is anything below or at the top.
            assert_eq!(
                inbox.process(&pool, &late, &handler).await.unwrap(),
                Outcome::Duplicate
            );
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
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
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
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
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
            assert_eq!(
                deliver(&inbox, &pool, &handler, "k", 11).await,
                Outcome::Processed
            );
            assert_eq!(
                deliver(&inbox, &pool, &handler, "other", 1).await,
                Outcome::Processed
            );
            assert_eq!(
                deliver(&inbox, &pool, &handler, "other", 1).await,
                Outcome::Duplicate
            );
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
                    let runs = runs(&missing);
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
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Duplicate
                );
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
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
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
            assert_eq!(
                inbox.process(&pool, &late, &failing).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(
                inbox.process(&pool, &late, &failing).await.unwrap(),
                Outcome::Duplicate
            );
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
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Processed);
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
            assert_eq!(deliver(&inbox, &pool, &handler, "new", 2).await, Outcome::Held);
            assert_eq!(key_seq(&pool, &c, "new").await, None);

            // The missing message arrives: the held one goes through on its next delivery.
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 2).await, Outcome::Processed);
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
                let recorded = id_rows(&pool, &c).await;
                for _ in 0..2 {
                    let err = inbox.process(&pool, &msg, &handler).await.unwrap_err();
                    assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
                    assert!(err.is_retryable());
                    // The handler's write and the dedup record were rolled back together.
                    assert_eq!(effects_of(&pool, msg.id).await, 0);
                    assert_eq!(id_rows(&pool, &c).await, recorded);
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
            // Sleeping inside the transaction keeps the first delivery uncommitted while the others
            // arrive: they wait for it and then see its record.
            let handler = Arc::new(Effect {
                sleep: Duration::from_millis(100),
                ..Effect::default()
            });
            // Unkeyed, a new key, a key that exists already.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "old", 1).await,
                Outcome::Processed
            );
            for msg in [unkeyed(), keyed("new", 1), keyed("old", 2)] {
                let outcomes = deliver_concurrently(&inbox, &pool, &handler, &msg).await;
                assert_eq!(tally(&outcomes), (1, 7), "{msg:?}: {outcomes:?}");
                assert_eq!(effects_of(&pool, msg.id).await, 1, "{msg:?}");
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
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
            }
            assert_eq!(gaps(&pool, &c, "k").await, [(2, 2), (4, 8), (10, 11)]);
            for seq in [2, 6, 10] {
                let msg = keyed("k", seq);
                let outcomes = deliver_concurrently(&inbox, &pool, &handler, &msg).await;
                assert_eq!(tally(&outcomes), (1, 7), "seq {seq}: {outcomes:?}");
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
            // 5 and 3 race on the key row: whichever goes first, both apply, and 2 and 4 stay missing.
            // Each seq is delivered twice; the deliveries start 5 ms apart in the order given, or all
            // at once.
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
                assert_eq!(tally(&outcomes), (2, 2), "{outcomes:?}");
                assert_eq!(key_seq(&pool, &c, key).await, Some(5));
                assert_eq!(gaps(&pool, &c, key).await, [(2, 2), (4, 4)]);
                for seq in [2, 4] {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Processed
                    );
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
            for (key, seqs) in [("old", [1, 5]), ("split", [1, 10])] {
                for seq in seqs {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Processed
                    );
                }
            }
            // "split" is split by a late message before its gap gets old: both parts keep its age.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "split", 5).await,
                Outcome::Processed
            );
            assert_eq!(gaps(&pool, &c, "split").await, [(2, 4), (6, 9)]);
            age(
                &pool,
                "outbox_inbox_gaps",
                "created_at",
                &format!("consumer = '{c}'"),
            )
            .await;
            for seq in [1, 4] {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "recent", seq).await,
                    Outcome::Processed
                );
            }

            // 3 expired gaps by batches of 2: 2 + 1. No unkeyed records to delete.
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 3);
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 0);
            assert_eq!(gaps(&pool, &c, "old").await, []);
            assert_eq!(gaps(&pool, &c, "split").await, []);
            assert_eq!(gaps(&pool, &c, "recent").await, [(2, 3)]);
            // Past the window a skipped message is taken for a duplicate; the key's gap_from, left
            // behind by the cleanup, is repaired on the way.
            assert_eq!(gap_from(&pool, &c, "old").await, Some(2));
            assert_eq!(
                deliver(&inbox, &pool, &handler, "old", 3).await,
                Outcome::Duplicate
            );
            assert_eq!(gap_from(&pool, &c, "old").await, None);
            assert_eq!(
                deliver(&inbox, &pool, &handler, "old", 3).await,
                Outcome::Duplicate
            );
            // Within the window it is processed.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "recent", 3).await,
                Outcome::Processed
            );
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
            for m in &old {
                assert_eq!(
                    inbox.process(&pool, m, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Processed);
            assert_eq!(
                other.process(&pool, &old[0], &handler).await.unwrap(),
                Outcome::Processed
            );
            // Everything so far is two days old (the other consumer's record and the key too).
            age(&pool, "outbox_inbox_messages", "processed_at", "1 = 1").await;
            age(&pool, "outbox_inbox_keys", "updated_at", "1 = 1").await;
            for m in &recent {
                assert_eq!(
                    inbox.process(&pool, m, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }

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
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Duplicate);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
            // Another consumer's rows are its own business (its window is 7 days).
            assert_eq!(id_rows(&pool, other.consumer()).await, 1);
            assert_eq!(other.cleanup(&pool, 100).await.unwrap(), 0);
        }
    };
}
