//! The suite's harness: imports, the pool with the business table, queries on the inbox tables,
//! the test handlers, delivery helpers and the metrics recorder every scenario of the suite uses.

/// The harness of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_harness {
    ($db:ty, $fresh:expr, $fresh_unmigrated:expr) => {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;

        use async_trait::async_trait;
        use outbox_inbox::{GapPolicy, Handler, Inbox, InboxError, Incoming, Outcome};
        use uuid::Uuid;
        use $crate::inbox_suite::{consumer, runs, Boom, Dialect};

        type Db = $db;
        type Pool = sqlx::Pool<Db>;

        /// A new migrated database, as the suite was given it.
        async fn migrated() -> Pool {
            $fresh.await
        }

        /// A new empty database, as the suite was given it.
        async fn unmigrated() -> Pool {
            $fresh_unmigrated.await
        }

        /// A new migrated database with the business table the test handler writes to: one row per
        /// time a message's effect committed. The metrics recorder is installed first.
        async fn pool() -> Pool {
            metrics_on();
            let pool = migrated().await;
            sqlx::raw_sql("CREATE TABLE effects (message_id VARCHAR(36) NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();
            pool
        }

        /// [`pool`], a consumer name no other test uses, and that consumer's inbox under `policy`.
        async fn inbox_on_fresh_pool(policy: GapPolicy) -> (Pool, String, Inbox) {
            let pool = pool().await;
            let c = consumer();
            let inbox = Inbox::new(&c).gap_policy(policy);
            (pool, c, inbox)
        }

        /// [`inbox_on_fresh_pool`] and a new test handler.
        async fn inbox_and_handler<H: Default>(policy: GapPolicy) -> (Pool, String, Inbox, H) {
            let (pool, c, inbox) = inbox_on_fresh_pool(policy).await;
            (pool, c, inbox, H::default())
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

        /// `column` of the key's row (None: the key has no row).
        async fn key_column(pool: &Pool, consumer: &str, key: &str, column: &str) -> Option<Option<i64>> {
            let key = <Db as Dialect>::key_is(key);
            sqlx::query_scalar(&format!(
                "SELECT {column} FROM outbox_inbox_keys WHERE consumer = '{consumer}' AND {key}"
            ))
            .fetch_optional(pool)
            .await
            .unwrap()
        }

        /// The key's highest seq (None: the key has no row).
        async fn key_seq(pool: &Pool, consumer: &str, key: &str) -> Option<i64> {
            key_column(pool, consumer, key, "seq").await.flatten()
        }

        /// The key's lower bound of its open gaps (None: no gap); the key has a row.
        async fn gap_from(pool: &Pool, consumer: &str, key: &str) -> Option<i64> {
            key_column(pool, consumer, key, "gap_from")
                .await
                .expect("the key has a row")
        }

        /// The open gaps of (consumer, key), lowest first.
        async fn gaps(pool: &Pool, consumer: &str, key: &str) -> Vec<(i64, i64)> {
            let key = <Db as Dialect>::key_is(key);
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
            let earlier = <Db as Dialect>::two_days_before(column);
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

        impl Effect {
            /// An effect that sleeps 100 ms inside the transaction: a delivery stays uncommitted
            /// while the concurrent ones arrive. Shared by the racing tasks.
            fn slow() -> Arc<Effect> {
                Arc::new(Effect {
                    sleep: Duration::from_millis(100),
                    ..Effect::default()
                })
            }
        }

        #[async_trait]
        impl Handler<Db> for Effect {
            type Error = Boom;

            async fn handle(&self, tx: &mut sqlx::Transaction<'_, Db>, msg: &Incoming<'_>) -> Result<(), Boom> {
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
            /// A recorder that fails once, on the first call for (`key`, `seq`).
            fn failing_once(key: &str, seq: i64) -> Recorder {
                Recorder {
                    fail_once: std::sync::Mutex::new(Some((key.to_owned(), seq))),
                    ..Recorder::default()
                }
            }

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
        impl Handler<Db> for Recorder {
            type Error = Boom;

            async fn handle(&self, tx: &mut sqlx::Transaction<'_, Db>, msg: &Incoming<'_>) -> Result<(), Boom> {
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

        /// [`deliver`]s `key` with each of `seqs` in turn; each comes out as `want`.
        async fn deliver_each(
            inbox: &Inbox,
            pool: &Pool,
            handler: &Effect,
            key: &'static str,
            seqs: impl IntoIterator<Item = i64>,
            want: Outcome,
        ) {
            for seq in seqs {
                assert_eq!(
                    deliver(inbox, pool, handler, key, seq).await,
                    want,
                    "{key} seq {seq}"
                );
            }
        }

        /// [`deliver`] with any handler.
        async fn deliver_with<H: Handler<Db>>(
            inbox: &Inbox,
            pool: &Pool,
            handler: &H,
            key: &'static str,
            seq: i64,
        ) -> Outcome {
            inbox.process(pool, &keyed(key, seq), handler).await.unwrap()
        }

        /// Processes `msg` twice in a row: it is processed, then a duplicate.
        async fn process_twice<H: Handler<Db>>(inbox: &Inbox, pool: &Pool, msg: &Incoming<'_>, handler: &H) {
            for want in [Outcome::Processed, Outcome::Duplicate] {
                assert_eq!(inbox.process(pool, msg, handler).await.unwrap(), want, "{msg:?}");
            }
        }

        /// Processes the message of each step in turn; each comes out as its step says.
        async fn process_steps<H: Handler<Db>>(
            inbox: &Inbox,
            pool: &Pool,
            handler: &H,
            steps: &[(Incoming<'_>, Outcome)],
        ) {
            for (i, (msg, want)) in steps.iter().enumerate() {
                assert_eq!(
                    inbox.process(pool, msg, handler).await.unwrap(),
                    *want,
                    "step {i}: {msg:?}"
                );
            }
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

        /// Installs the recorder before anything is counted ([`pool`] calls it).
        fn metrics_on() {
            $crate::inbox_suite::RECORDER.call_once(|| {
                metrics::set_global_recorder(Counters).expect("only the inbox suite sets a recorder");
            });
        }

        fn counter(name: &str, consumer: &str) -> u64 {
            $crate::inbox_suite::counter_value(name, consumer)
        }
    };
}
