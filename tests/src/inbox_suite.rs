//! The conformance suite every inbox backend passes. `inbox_suite!(Db, fresh, fresh_unmigrated)`
//! expands to one `#[tokio::test]` per scenario, where `fresh` is a future of a new, migrated
//! `Pool<Db>` and `fresh_unmigrated` one of a new, empty one; each scenario is written once, for
//! every database. The crate that expands it needs `outbox-inbox`
//! (with the database's feature), `metrics`, `async-trait`, `sqlx`, `tokio` and `uuid`.
//!
//! The suite's own statements are portable SQL with the values inlined (generated consumer names,
//! test keys and ids: nothing to quote), on a business table `effects` created by the suite. What
//! cannot be written portably, picking a key's rows in the inbox tables, moving a time back, the
//! outbox's migrations and store, comes from the database's [`Dialect`]: a new backend implements it
//! to get the suite.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Once, OnceLock};

/// The SQL (and the outbox pieces) the suite cannot state once for all databases.
pub trait Dialect: sqlx::Database {
    /// A condition selecting the rows of `key` (a test key, no quotes in it) in
    /// `outbox_inbox_keys` and `outbox_inbox_gaps`.
    fn key_is(key: &str) -> String;
    /// An expression: the time in `column` (a time column of the inbox tables) two days earlier.
    fn two_days_before(column: &str) -> String;
    /// Column names and values identifying `key` (a test key) in an `INSERT` into
    /// `outbox_inbox_keys` (or, with `gaps`, `outbox_inbox_gaps`) as migration 0002 created them:
    /// `(columns, values)`.
    fn key_insert(key: &str, gaps: bool) -> (&'static str, String);
    /// Placeholder number `n` (from 1) of a statement.
    fn param(n: usize) -> String;
    /// An expression of the current time for the inbox tables' time columns.
    fn now() -> &'static str;
    /// The type of a binary column.
    fn blob() -> &'static str;
    /// The outbox's embedded migrations.
    fn migrator() -> &'static sqlx::migrate::Migrator;
    /// Runs the outbox's `migrate`.
    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>>;
    /// The relay's store on `pool`.
    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store>;
}

impl Dialect for sqlx::Postgres {
    fn key_is(key: &str) -> String {
        format!("key = '{key}'")
    }

    fn two_days_before(column: &str) -> String {
        format!("{column} - interval '2 days'")
    }

    fn key_insert(key: &str, _gaps: bool) -> (&'static str, String) {
        ("key", format!("'{key}'"))
    }

    fn param(n: usize) -> String {
        format!("${n}")
    }

    fn now() -> &'static str {
        "now()"
    }

    fn blob() -> &'static str {
        "BYTEA"
    }

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &outbox::postgres::MIGRATOR
    }

    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>> {
        Box::pin(outbox::postgres::migrate(pool))
    }

    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store> {
        std::sync::Arc::new(outbox::postgres::PgStore::new(pool))
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

    fn key_insert(key: &str, gaps: bool) -> (&'static str, String) {
        if gaps {
            ("key_hash", format!("UNHEX(SHA2('{key}', 256))"))
        } else {
            ("`key`, key_hash", format!("'{key}', UNHEX(SHA2('{key}', 256))"))
        }
    }

    fn param(_: usize) -> String {
        "?".into()
    }

    fn now() -> &'static str {
        "UTC_TIMESTAMP(6)"
    }

    fn blob() -> &'static str {
        "BLOB"
    }

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &outbox::mysql::MIGRATOR
    }

    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>> {
        Box::pin(outbox::mysql::migrate(pool))
    }

    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store> {
        std::sync::Arc::new(outbox::mysql::MySqlStore::new(pool))
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

    fn key_insert(key: &str, _gaps: bool) -> (&'static str, String) {
        ("key", format!("'{key}'"))
    }

    fn param(_: usize) -> String {
        "?".into()
    }

    fn now() -> &'static str {
        "1700000000000000"
    }

    fn blob() -> &'static str {
        "BLOB"
    }

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &outbox::sqlite::MIGRATOR
    }

    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>> {
        Box::pin(outbox::sqlite::migrate(pool))
    }

    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store> {
        std::sync::Arc::new(outbox::sqlite::SqliteStore::new(pool))
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
    ($db:ty, $fresh:expr, $fresh_unmigrated:expr) => {
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

        /// What a handler saw of one message, owned.
        #[derive(Debug, Clone, PartialEq, Eq)]
        struct Saw {
            id: Uuid,
            key: Option<String>,
            seq: Option<i64>,
            topic: String,
            payload: Vec<u8>,
            headers: Vec<(String, Vec<u8>)>,
        }

        impl Saw {
            fn of(msg: &Incoming<'_>) -> Saw {
                Saw {
                    id: msg.id,
                    key: msg.key.map(str::to_owned),
                    seq: msg.seq,
                    topic: msg.topic.to_owned(),
                    payload: msg.payload.to_vec(),
                    headers: msg
                        .headers
                        .iter()
                        .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
                        .collect(),
                }
            }
        }

        /// Inserts one effect row per message and keeps what it saw of every call, in call order.
        /// Fails once on the first call for `fail_once` (key, seq), after writing (the rollback must
        /// undo it), optionally sleeping inside the transaction.
        #[derive(Default)]
        struct Recorder {
            saw: std::sync::Mutex<Vec<Saw>>,
            fail_once: std::sync::Mutex<Option<(String, i64)>>,
            sleep: Duration,
        }

        impl Recorder {
            /// Every call so far, in order (calls of rolled-back transactions included).
            fn calls(&self) -> Vec<Saw> {
                self.saw.lock().unwrap().clone()
            }

            /// (key, seq) of every call so far, in order.
            fn order(&self) -> Vec<(String, i64)> {
                self.calls()
                    .into_iter()
                    .map(|s| (s.key.unwrap_or_default(), s.seq.unwrap_or_default()))
                    .collect()
            }
        }

        #[async_trait]
        impl Handler<$db> for Recorder {
            type Error = Boom;

            async fn handle(&self, tx: &mut sqlx::Transaction<'_, $db>, msg: &Incoming<'_>) -> Result<(), Boom> {
                self.saw.lock().unwrap().push(Saw::of(msg));
                let insert = format!("INSERT INTO effects (message_id) VALUES ('{}')", msg.id);
                sqlx::query(&insert).execute(&mut **tx).await.map_err(|_| Boom)?;
                if !self.sleep.is_zero() {
                    tokio::time::sleep(self.sleep).await;
                }
                let mut fail = self.fail_once.lock().unwrap();
                let this = msg.key.map(str::to_owned).zip(msg.seq);
                if this.is_some() && *fail == this {
                    *fail = None;
                    return Err(Boom);
                }
                Ok(())
            }
        }

        /// Rows of `consumer` in the parked messages' table.
        async fn parked_rows(pool: &Pool, consumer: &str) -> i64 {
            count(
                pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_parked WHERE consumer = '{consumer}'"),
            )
            .await
        }

        fn unkeyed() -> Incoming<'static> {
            Incoming::new(Uuid::now_v7(), "orders", b"payload")
        }

        fn keyed(key: &'static str, seq: i64) -> Incoming<'static> {
            Incoming::new(Uuid::now_v7(), "orders", b"payload").keyed(key, seq)
        }

        /// Delivers a new message (new id) of `key` with `seq`.
        async fn deliver(inbox: &Inbox, pool: &Pool, handler: &Effect, key: &'static str, seq: i64) -> Outcome {
            deliver_with(inbox, pool, handler, key, seq).await
        }

        /// [`deliver`] with any handler.
        async fn deliver_with<H: Handler<$db>>(
            inbox: &Inbox,
            pool: &Pool,
            handler: &H,
            key: &'static str,
            seq: i64,
        ) -> Outcome {
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
        async fn under_hold_a_successor_delivered_first_is_parked_and_applied_right_after_its_predecessor() {
            metrics_on();
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
            let handler = Recorder::default();
            // The relay re-sent K:1 and K:2 after a timeout: the partition holds K:2, then K:1.
            let id2 = Uuid::now_v7().to_string();
            let headers2: Vec<(&str, &[u8])> = vec![
                ("outbox-id", id2.as_bytes()),
                ("outbox-key", b"K"),
                ("outbox-seq", b"2"),
                ("content-type", b"application/json"),
                ("raw", b"\x00\xff\x01"),
                ("empty", b""),
                ("raw", b"again"),
            ];
            let k2 = Incoming::from_headers("orders", b"{\"n\":2}", headers2.clone()).unwrap();
            for expected in [Outcome::Parked, Outcome::Duplicate] {
                // Done for the runner (it stores the offset and moves on), not applied yet; the
                // second delivery is a duplicate of the parked message.
                let out = inbox.process(&pool, &k2, &handler).await.unwrap();
                assert!(out.is_done(), "{out:?}");
                assert_eq!(out, expected);
            }
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert!(handler.calls().is_empty());
            // Other keys meanwhile: "m" in order, "n" in reverse (3 and 2 wait for 1).
            let m: Vec<_> = (1..=2).map(|seq| keyed("m", seq)).collect();
            let n: Vec<_> = (1..=3).map(|seq| keyed("n", seq)).collect();
            for msg in &m {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }
            for msg in [&n[2], &n[1], &n[2]] {
                let out = inbox.process(&pool, msg, &handler).await.unwrap();
                assert!(out.is_done(), "{out:?}");
                assert_ne!(out, Outcome::Processed);
            }
            assert_eq!(counter("outbox_inbox_parked_total", &c), 3);
            assert_eq!(counter("outbox_inbox_duplicates_total", &c), 2);
            assert_eq!(parked_rows(&pool, &c).await, 3);

            // K:1 arrives: K:2 is applied right after it, in the same transaction.
            let k1 = keyed("K", 1);
            assert_eq!(
                inbox.process(&pool, &k1, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(
                inbox.process(&pool, &n[0], &handler).await.unwrap(),
                Outcome::Processed
            );
            let order = handler.order();
            let expected: Vec<(String, i64)> = [
                ("m", 1),
                ("m", 2),
                ("K", 1),
                ("K", 2),
                ("n", 1),
                ("n", 2),
                ("n", 3),
            ]
            .iter()
            .map(|(k, s)| ((*k).to_owned(), *s))
            .collect();
            assert_eq!(order, expected);
            // The parked message reached the handler as it was delivered.
            let saw = handler.calls().into_iter().find(|s| s.id == k2.id).unwrap();
            assert_eq!(saw, Saw::of(&k2));
            assert_eq!(saw.payload, b"{\"n\":2}");
            assert_eq!(
                saw.headers,
                headers2
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
                    .collect::<Vec<_>>()
            );
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_seq(&pool, &c, "K").await, Some(2));
            assert_eq!(key_seq(&pool, &c, "n").await, Some(3));

            // Every message again: duplicates, nothing applied twice.
            for msg in [&k2, &k1].into_iter().chain(&m).chain(&n) {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "{msg:?}"
                );
            }
            for msg in [&k2, &k1].into_iter().chain(&m).chain(&n) {
                assert_eq!(effects_of(&pool, msg.id).await, 1, "{msg:?}");
            }
            assert_eq!(effects(&pool).await, 7);
            assert_eq!(handler.calls().len(), 7);
            // The key goes on as usual.
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "K", 3).await,
                Outcome::Processed
            );
            assert_eq!(counter("outbox_inbox_processed_total", &c), 8);
            assert_eq!(counter("outbox_inbox_unparked_total", &c), 3);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
        }

        #[tokio::test]
        async fn under_hold_a_key_first_seen_above_1_waits_for_its_beginning_without_stalling() {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
            let handler = Recorder::default();
            // 4 and 2 wait for 1; 3 is missing when 1 comes: 1 and 2 apply, 4 keeps waiting.
            for seq in [4, 2] {
                let out = deliver_with(&inbox, &pool, &handler, "k", seq).await;
                assert!(out.is_done(), "{out:?}");
                assert_eq!(out, Outcome::Parked);
            }
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "k", 1).await,
                Outcome::Processed
            );
            assert_eq!(handler.order(), [("k".to_owned(), 1), ("k".to_owned(), 2)]);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(2));
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "k", 3).await,
                Outcome::Processed
            );
            assert_eq!(handler.order(), [1, 2, 3, 4].map(|s| ("k".to_owned(), s)));
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
            // Under Hold nothing was skipped: no gap was recorded.
            assert_eq!(gaps(&pool, &c, "k").await, []);
            for seq in 1..=4 {
                assert_eq!(
                    deliver_with(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Duplicate
                );
            }
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn under_hold_a_failing_parked_successor_rolls_back_its_predecessor_too() {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
            let handler = Recorder {
                fail_once: std::sync::Mutex::new(Some(("k".to_owned(), 2))),
                ..Recorder::default()
            };
            let k2 = keyed("k", 2);
            assert_eq!(
                inbox.process(&pool, &k2, &handler).await.unwrap(),
                Outcome::Parked
            );
            let k1 = keyed("k", 1);
            let err = inbox.process(&pool, &k1, &handler).await.unwrap_err();
            assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
            assert!(err.is_retryable());
            // One transaction: neither effect committed, 2 is still parked.
            assert_eq!(effects(&pool).await, 0);
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(
                inbox.process(&pool, &k1, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(effects_of(&pool, k1.id).await, 1);
            assert_eq!(effects_of(&pool, k2.id).await, 1);
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(
                inbox.process(&pool, &k2, &handler).await.unwrap(),
                Outcome::Duplicate
            );
            assert_eq!(effects(&pool).await, 2);
        }

        #[tokio::test]
        async fn under_hold_a_predecessor_and_its_successor_delivered_concurrently_apply_once_in_order() {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
            // Sleeping inside the transaction keeps the first delivery uncommitted while the others
            // arrive.
            let handler = Arc::new(Recorder {
                sleep: Duration::from_millis(50),
                ..Recorder::default()
            });
            // Each seq delivered twice; the deliveries start 5 ms apart in the order given, or all
            // at once.
            let mut keys = Vec::new();
            for (order, stagger) in [
                ([2, 1, 2, 1], 5),
                ([1, 2, 1, 2], 5),
                ([2, 1, 1, 2], 0),
                ([1, 2, 2, 1], 0),
            ] {
                let key: &'static str = Box::leak(format!("k-{}", Uuid::new_v4().simple()).into_boxed_str());
                keys.push(key);
                let msgs = [keyed(key, 1), keyed(key, 2)];
                let tasks: Vec<_> = order
                    .into_iter()
                    .enumerate()
                    .map(|(i, seq)| {
                        let (pool, inbox, handler) = (pool.clone(), inbox.clone(), handler.clone());
                        let msg = msgs[seq as usize - 1].clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(stagger * i as u64)).await;
                            inbox.process(&pool, &msg, &*handler).await.unwrap()
                        })
                    })
                    .collect();
                for t in tasks {
                    let out = t.await.unwrap();
                    assert!(out.is_done(), "{order:?}: {out:?}");
                }
                for msg in &msgs {
                    assert_eq!(effects_of(&pool, msg.id).await, 1, "{order:?}");
                }
                assert_eq!(key_seq(&pool, &c, key).await, Some(2), "{order:?}");
            }
            assert_eq!(parked_rows(&pool, &c).await, 0);
            let order = handler.order();
            for key in keys {
                let of_key: Vec<i64> = order.iter().filter(|(k, _)| k == key).map(|(_, s)| *s).collect();
                assert_eq!(of_key, [1, 2], "{key}");
            }
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
        async fn a_gap_stays_open_until_filled_whatever_the_retention_and_the_cleanup() {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).retention(Duration::from_millis(1));
            let handler = Effect::default();
            for (key, seqs) in [("old", [1, 5]), ("split", [1, 10])] {
                for seq in seqs {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Processed
                    );
                }
            }
            // "split" is split by a late message before the cleanup.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "split", 5).await,
                Outcome::Processed
            );
            let msg = unkeyed();
            assert_eq!(
                inbox.process(&pool, &msg, &handler).await.unwrap(),
                Outcome::Processed
            );
            // Far past the window (the rows are two days old; the window is 1 ms).
            age(
                &pool,
                "outbox_inbox_gaps",
                "created_at",
                &format!("consumer = '{c}'"),
            )
            .await;
            age(
                &pool,
                "outbox_inbox_messages",
                "processed_at",
                &format!("consumer = '{c}'"),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;

            // Only the unkeyed record goes: the open gaps are kept until filled.
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 1);
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 0);
            assert_eq!(gaps(&pool, &c, "old").await, [(2, 4)]);
            assert_eq!(gaps(&pool, &c, "split").await, [(2, 4), (6, 9)]);
            // A skipped message arriving now (a dead letter replayed a week later) is processed,
            // once.
            for (key, seq) in [("old", 3), ("split", 2), ("split", 9)] {
                let late = keyed(key, seq);
                assert_eq!(
                    inbox.process(&pool, &late, &handler).await.unwrap(),
                    Outcome::Processed,
                    "{key} {seq}"
                );
                assert_eq!(
                    inbox.process(&pool, &late, &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "{key} {seq}"
                );
            }
            assert_eq!(gaps(&pool, &c, "old").await, [(2, 2), (4, 4)]);
            assert_eq!(gaps(&pool, &c, "split").await, [(3, 4), (6, 8)]);
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 0);
            assert_eq!(gaps(&pool, &c, "old").await, [(2, 2), (4, 4)]);
            assert_eq!(effects(&pool).await, 2 + 3 + 1 + 3);
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

        #[tokio::test]
        async fn the_same_key_from_two_outboxes_is_applied_once_per_outbox() {
            metrics_on();
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c);
            let handler = Effect::default();
            // Two services, each with its own outbox database, both enqueue key "order-42".
            let (a, b) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
            let ids: Vec<String> = (0..4).map(|_| Uuid::now_v7().to_string()).collect();
            let seq_text = ["1", "2"];
            let msgs: Vec<Incoming<'_>> = [(&a, 0), (&b, 0), (&b, 1), (&a, 1)]
                .iter()
                .enumerate()
                .map(|(i, (source, s))| {
                    Incoming::from_headers(
                        "orders",
                        b"{}",
                        [
                            ("outbox-id", ids[i].as_bytes()),
                            ("outbox-key", &b"order-42"[..]),
                            ("outbox-seq", seq_text[*s].as_bytes()),
                            ("outbox-source", source.as_bytes()),
                        ],
                    )
                    .unwrap()
                })
                .collect();
            for msg in &msgs {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Processed,
                    "{msg:?}"
                );
            }
            for msg in &msgs {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "{msg:?}"
                );
            }
            assert_eq!(effects(&pool).await, 4);
            // Neither outbox's numbering looked like a gap in the other's.
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
        }

        #[tokio::test]
        async fn the_claim_carries_the_outbox_databases_source_and_two_outboxes_stay_apart() {
            let pool = pool().await;
            let inbox = Inbox::new(consumer());
            let handler = Effect::default();
            // Two outbox databases, each with its own source id, both enqueue key "order-42".
            let mut sources = Vec::new();
            let mut claimed = Vec::new();
            for _ in 0..2 {
                let outbox_db: Pool = $fresh.await;
                let source: String = sqlx::query_scalar("SELECT id FROM outbox_source")
                    .fetch_one(&outbox_db)
                    .await
                    .unwrap();
                assert!(!source.is_empty());
                let mut tx = outbox_db.begin().await.unwrap();
                for n in 1..=2 {
                    let msg = outbox::Message::new("orders", format!("{n}")).key("order-42");
                    outbox::enqueue(&mut tx, &msg).await.unwrap();
                }
                tx.commit().await.unwrap();
                let store = <$db as Dialect>::store(outbox_db);
                let leases = store
                    .acquire("suite", outbox::LANES as usize, Duration::from_secs(30))
                    .await
                    .unwrap();
                let lane = outbox::lane_of(Some("order-42"), Uuid::nil(), outbox::LANES);
                let lease = leases.iter().find(|l| l.lane == lane).unwrap();
                let rows = store.claim(lease, 10, &[]).await.unwrap();
                assert_eq!(rows.len(), 2);
                for row in &rows {
                    assert_eq!(row.source.as_deref(), Some(source.as_str()));
                }
                sources.push(source);
                claimed.extend(rows);
            }
            assert_ne!(sources[0], sources[1]);
            // Delivered with the headers the publisher sends: every message applies once.
            for expected in [Outcome::Processed, Outcome::Duplicate] {
                for row in &claimed {
                    let (id, seq) = (row.id.to_string(), row.seq.unwrap().to_string());
                    let headers = [
                        (outbox::HEADER_ID, id.as_bytes()),
                        (outbox::HEADER_KEY, row.key.as_deref().unwrap().as_bytes()),
                        (outbox::HEADER_SEQ, seq.as_bytes()),
                        (outbox::HEADER_SOURCE, row.source.as_deref().unwrap().as_bytes()),
                    ];
                    let msg = Incoming::from_headers("orders", &row.payload, headers).unwrap();
                    assert_eq!(msg.source, row.source.as_deref());
                    assert_eq!(
                        inbox.process(&pool, &msg, &handler).await.unwrap(),
                        expected,
                        "{row:?}"
                    );
                }
            }
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn under_expect_seqs_of_other_topics_are_not_counted_and_a_late_one_still_applies() {
            metrics_on();
            let pool = pool().await;
            let handler = Effect::default();
            // Key "k": 1 and 3 are sent to "orders", 2 to "invoices", which these consumers do not
            // read; 4 to "orders" is delivered late.
            let msgs = [keyed("k", 1), keyed("k", 3), keyed("k", 5), keyed("k", 4)];
            for (policy, gaps_counted) in [(GapPolicy::Expect, 0), (GapPolicy::Accept, 2)] {
                let c = consumer();
                let inbox = Inbox::new(&c).gap_policy(policy);
                for msg in &msgs {
                    assert_eq!(
                        inbox.process(&pool, msg, &handler).await.unwrap(),
                        Outcome::Processed
                    );
                    assert_eq!(
                        inbox.process(&pool, msg, &handler).await.unwrap(),
                        Outcome::Duplicate
                    );
                }
                assert_eq!(counter("outbox_inbox_gaps_total", &c), gaps_counted, "{policy:?}");
                assert_eq!(counter("outbox_inbox_gap_fills_total", &c), 1, "{policy:?}");
                // The seq sent elsewhere stays an open gap: if it ever reaches this consumer, it
                // applies.
                assert_eq!(gaps(&pool, &c, "k").await, [(2, 2)], "{policy:?}");
                assert_eq!(key_seq(&pool, &c, "k").await, Some(5));
            }
            assert_eq!(effects(&pool).await, 2 * 4);
        }

        #[tokio::test]
        async fn records_written_before_sources_keep_working_after_the_migration() {
            // A database migrated up to 0002 (the inbox without sources), with records in it.
            let pool: Pool = $fresh_unmigrated.await;
            let blob = <$db as Dialect>::blob();
            sqlx::raw_sql(&format!(
                "CREATE TABLE outbox_schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
                 checksum {blob} NOT NULL, installed_on BIGINT)"
            ))
            .execute(&pool)
            .await
            .unwrap();
            let p = <$db as Dialect>::param;
            let record = format!(
                "INSERT INTO outbox_schema_migrations (version, description, checksum) VALUES ({}, {}, {})",
                p(1),
                p(2),
                p(3)
            );
            for m in <$db as Dialect>::migrator().iter().filter(|m| m.version <= 2) {
                sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
                sqlx::query(&record)
                    .bind(m.version)
                    .bind(&*m.description)
                    .bind(&*m.checksum)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            let c = consumer();
            let now = <$db as Dialect>::now();
            // Key "k" applied up to 2; key "g" up to 4 with 2..=3 skipped; one unkeyed message.
            for (key, seq, gap_from) in [("k", 2, "NULL"), ("g", 4, "2")] {
                let (cols, vals) = <$db as Dialect>::key_insert(key, false);
                sqlx::raw_sql(&format!(
                    "INSERT INTO outbox_inbox_keys (consumer, {cols}, seq, gap_from, updated_at) \
                     VALUES ('{c}', {vals}, {seq}, {gap_from}, {now})"
                ))
                .execute(&pool)
                .await
                .unwrap();
            }
            let (cols, vals) = <$db as Dialect>::key_insert("g", true);
            sqlx::raw_sql(&format!(
                "INSERT INTO outbox_inbox_gaps (consumer, {cols}, from_seq, to_seq, created_at) \
                 VALUES ('{c}', {vals}, 2, 3, {now})"
            ))
            .execute(&pool)
            .await
            .unwrap();
            let old = unkeyed();
            sqlx::query(&format!(
                "INSERT INTO outbox_inbox_messages (consumer, message_id, processed_at) VALUES ({}, {}, {now})",
                p(1),
                p(2)
            ))
            .bind(&c)
            .bind(old.id)
            .execute(&pool)
            .await
            .unwrap();

            <$db as Dialect>::migrate(&pool).await.unwrap();
            let versions: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM outbox_schema_migrations ORDER BY version")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            // 0003 and whatever came after it.
            let all: Vec<i64> = <$db as Dialect>::migrator().iter().map(|m| m.version).collect();
            assert_eq!(versions, all);
            assert_eq!(versions[..3], [1, 2, 3]);
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox_source")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(ids.len(), 1);
            sqlx::raw_sql("CREATE TABLE effects (message_id VARCHAR(36) NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();

            // Messages without a source (a relay that predates it) find their records as before.
            let inbox = Inbox::new(&c);
            let handler = Effect::default();
            let steps = [
                ("k", 1, Outcome::Duplicate),
                ("k", 2, Outcome::Duplicate),
                ("k", 3, Outcome::Processed),
                ("g", 3, Outcome::Processed),
                ("g", 3, Outcome::Duplicate),
                ("g", 4, Outcome::Duplicate),
            ];
            for (key, seq, expected) in steps {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, key, seq).await,
                    expected,
                    "{key} {seq}"
                );
            }
            assert_eq!(
                inbox.process(&pool, &old, &handler).await.unwrap(),
                Outcome::Duplicate
            );
            // The first message of a key with a source takes the key's records over: the upgraded
            // relay sending a message again is still recognised, and a gap still fills.
            let source = Uuid::new_v4().to_string();
            let sourced = |key: &'static str, seq: i64| keyed(key, seq).source(source.as_str());
            let steps = [
                ("k", 3, Outcome::Duplicate),
                ("k", 4, Outcome::Processed),
                ("g", 2, Outcome::Processed),
                ("g", 2, Outcome::Duplicate),
                ("g", 3, Outcome::Duplicate),
            ];
            for (key, seq, expected) in steps {
                let msg = sourced(key, seq);
                assert_eq!(
                    inbox.process(&pool, &msg, &handler).await.unwrap(),
                    expected,
                    "{key} {seq}"
                );
            }
            let default_rows = count(
                &pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_keys WHERE consumer = '{c}' AND source = ''"),
            )
            .await;
            assert_eq!(default_rows, 0);
            assert_eq!(key_rows(&pool, &c).await, 2);
            assert_eq!(gaps(&pool, &c, "g").await, []);
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn a_parked_message_without_source_goes_over_with_its_key() {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
            let handler = Recorder::default();
            // Before the relay sent sources: 1 applied, 3 parked.
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "k", 1).await,
                Outcome::Processed
            );
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "k", 3).await,
                Outcome::Parked
            );
            // 2 comes from the upgraded relay, with its source: 3 follows it.
            let source = Uuid::new_v4().to_string();
            let two = keyed("k", 2).source(&source);
            assert_eq!(
                inbox.process(&pool, &two, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(handler.order(), [1, 2, 3].map(|s| ("k".to_owned(), s)));
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_rows(&pool, &c).await, 1);
            for seq in 1..=3 {
                let msg = keyed("k", seq).source(&source);
                assert_eq!(
                    inbox.process(&pool, &msg, &handler).await.unwrap(),
                    Outcome::Duplicate
                );
            }
            assert_eq!(effects(&pool).await, 3);
        }

        #[tokio::test]
        async fn parked_messages_whose_predecessor_is_gone_for_good_can_be_released_in_order() {
            metrics_on();
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(GapPolicy::Hold);
            let handler = Recorder::default();
            let source = Uuid::new_v4().to_string();
            let sourced = |seq: i64| keyed("k", seq).source(source.as_str());
            // 1 and 2 are lost for good (say, discarded dead letters); 3 and 5 wait for them.
            for seq in [5, 3] {
                assert_eq!(
                    inbox.process(&pool, &sourced(seq), &handler).await.unwrap(),
                    Outcome::Parked
                );
            }
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "other", 2).await,
                Outcome::Parked
            );
            // Nothing parked for that key, or that source: nothing to do.
            assert_eq!(inbox.release_parked(&pool, None, "k", &handler).await.unwrap(), 0);
            assert_eq!(
                inbox
                    .release_parked(&pool, Some(source.as_str()), "none", &handler)
                    .await
                    .unwrap(),
                0
            );
            assert!(handler.calls().is_empty());
            // Looking did not create a key row for the default source.
            assert_eq!(key_rows(&pool, &c).await, 2);

            assert_eq!(
                inbox
                    .release_parked(&pool, Some(source.as_str()), "k", &handler)
                    .await
                    .unwrap(),
                2
            );
            assert_eq!(handler.order(), [3, 5].map(|s| ("k".to_owned(), s)));
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 2);
            // The seqs given up on are open gaps: if they ever arrive, they apply, once.
            let gap_rows = count(
                &pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_gaps WHERE consumer = '{c}' AND source = '{source}'"),
            )
            .await;
            assert_eq!(gap_rows, 2);
            for (seq, expected) in [
                (4, Outcome::Processed),
                (4, Outcome::Duplicate),
                (5, Outcome::Duplicate),
                (6, Outcome::Processed),
                (1, Outcome::Processed),
            ] {
                assert_eq!(
                    inbox.process(&pool, &sourced(seq), &handler).await.unwrap(),
                    expected,
                    "{seq}"
                );
            }
            assert_eq!(handler.order(), [3, 5, 4, 6, 1].map(|s| ("k".to_owned(), s)));
            assert_eq!(effects(&pool).await, 5);
            // A failing handler releases nothing.
            let failing = Recorder {
                fail_once: std::sync::Mutex::new(Some(("other".to_owned(), 2))),
                ..Recorder::default()
            };
            let err = inbox
                .release_parked(&pool, None, "other", &failing)
                .await
                .unwrap_err();
            assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(
                inbox
                    .release_parked(&pool, None, "other", &failing)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "other", 3).await,
                Outcome::Processed
            );
            assert_eq!(effects(&pool).await, 7);
        }
    };
}
