//! MySQL/MariaDB- and SQLite-specific behaviour: migrations beside the application's own sqlx
//! migrator, concurrent migrations, the audit trail of published rows, batches larger than one
//! statement, and keys compared byte for byte.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outbox::{Delivered, Lease, Message, Store, StoreAdmin};
use outbox_tests::conformance::{claim_all, take_all, OWNER};
use sqlx::migrate::Migrator;

/// A directory with the application's own sqlx migrations: an `orders` table.
fn app_migrations() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("app-migrations-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("20240101000000_orders.sql"),
        "CREATE TABLE orders (id BIGINT PRIMARY KEY);",
    )
    .unwrap();
    dir
}

/// Adds a second application migration.
fn more_app_migrations(dir: &std::path::Path) {
    std::fs::write(
        dir.join("20240102000000_more.sql"),
        "ALTER TABLE orders ADD COLUMN note TEXT;",
    )
    .unwrap();
}

/// Publishes `rows` under `leases` (each row with its lane's lease), partition 0, offset = seq.
async fn publish(store: &dyn Store, leases: &[Lease], rows: &[outbox::StoredMessage]) {
    for l in leases {
        let done: Vec<Delivered> = rows
            .iter()
            .filter(|r| r.lane == l.lane)
            .map(|r| Delivered::new(r.pos).at(3, r.seq.unwrap_or(0)))
            .collect();
        store.mark_published(l, &done).await.unwrap();
    }
}

/// 2,500 messages in one batch (more than one statement's worth of rows) over 7 keys and unkeyed
/// ones: every key gets a dense run of seqs in slice order, and claims return them in that order.
async fn big_batch<DB: outbox::Backend>(pool: &sqlx::Pool<DB>, store: &dyn Store) {
    let msgs: Vec<Message> = (0..2500)
        .map(|i| {
            let m = Message::new("t", format!("{i}"));
            if i % 10 == 9 {
                m
            } else {
                m.key(format!("key-{}", i % 7))
            }
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    // One message first, so the batch continues an existing counter.
    outbox::enqueue(&mut tx, &Message::new("t", "first").key("key-0"))
        .await
        .unwrap();
    let out = outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let mut next: HashMap<&str, i64> = HashMap::new();
    next.insert("key-0", 2);
    for (m, e) in msgs.iter().zip(&out) {
        assert_eq!(m.id(), e.id);
        match m.key_str() {
            None => assert_eq!(e.seq, None),
            Some(k) => {
                let want = next.entry(k).or_insert(1);
                assert_eq!(e.seq, Some(*want), "key {k}");
                *want += 1;
            }
        }
    }
    let leases = take_all(store, OWNER).await;
    let rows = claim_all(store, &leases).await;
    assert_eq!(rows.len(), 2501);
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        if let (Some(k), Some(s)) = (&r.key, r.seq) {
            let prev = last.insert(k.clone(), s).unwrap_or(0);
            assert_eq!(s, prev + 1, "key {k} claimed in seq order");
        }
    }
}

/// Writers enqueue into a few hot keys concurrently while a relay claims and publishes: every claim
/// continues each key exactly where the previous one stopped (no gap, no reordering), and in the
/// end every message was claimed once.
async fn writers_and_a_relay<DB: outbox::Backend>(pool: sqlx::Pool<DB>, store: Arc<dyn Store>) {
    let leases = take_all(&*store, OWNER).await;
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in 0..25u64 {
                    let mut tx = pool.begin().await.unwrap();
                    // Keys in a fixed order within a transaction, as any two writers of the same
                    // keys must (else they can deadlock on the counters, on every database).
                    let mut keys: Vec<u64> = (0..1 + (w + i) % 3).map(|j| (w * 7 + i * 3 + j) % 5).collect();
                    keys.sort();
                    let msgs: Vec<Message> = keys
                        .iter()
                        .map(|k| Message::new("t", format!("{w}-{i}-{k}")).key(format!("hot-{k}")))
                        .collect();
                    if i % 2 == 0 {
                        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                    } else {
                        for m in &msgs {
                            outbox::enqueue(&mut tx, m).await.unwrap();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis((w + i) % 3)).await;
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    let expected: usize = (0..8u64)
        .map(|w| (0..25u64).map(|i| (1 + (w + i) % 3) as usize).sum::<usize>())
        .sum();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = 0;
    let started = std::time::Instant::now();
    while seen < expected {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {seen} of {expected} claimed"
        );
        let rows = claim_all(&*store, &leases).await;
        for r in &rows {
            let (k, s) = (r.key.clone().unwrap(), r.seq.unwrap());
            let prev = last.insert(k.clone(), s).unwrap_or(0);
            assert_eq!(s, prev + 1, "key {k}: claimed seq {s} after {prev}");
        }
        seen += rows.len();
        publish(&*store, &leases, &rows).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(claim_all(&*store, &leases).await.is_empty());
    assert_eq!(last.values().sum::<i64>() as usize, expected);
}

/// The scenarios MySQL/MariaDB and SQLite share: `other_db_suite!(module, Store, fresh,
/// fresh_unmigrated, kept-rows query, key type of that query, how the key "k" reads back)`.
macro_rules! other_db_suite {
    ($module:ident, $store:ident, $fresh:ident, $fresh_unmigrated:ident, $kept_sql:literal, $key:ty, $k:expr) => {
        use outbox::$module::$store;

        #[tokio::test]
        async fn concurrent_writers_and_a_relay_keep_every_key_in_order() {
            let pool = outbox_tests::db::$fresh().await;
            writers_and_a_relay(pool.clone(), Arc::new($store::new(pool))).await;
        }

        #[tokio::test]
        async fn migrations_coexist_with_the_applications_own_sqlx_migrator() {
            let pool = outbox_tests::db::$fresh_unmigrated().await;
            let dir = app_migrations();
            let app = Migrator::new(dir.as_path()).await.unwrap();

            app.run(&pool).await.unwrap();
            outbox::$module::migrate(&pool).await.unwrap();
            // Each side runs again, in both orders, without seeing the other's rows.
            app.run(&pool).await.unwrap();
            outbox::$module::migrate(&pool).await.unwrap();
            more_app_migrations(&dir);
            let app = Migrator::new(dir.as_path()).await.unwrap();
            app.run(&pool).await.unwrap();
            outbox::$module::migrate(&pool).await.unwrap();

            let app_versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(app_versions, vec![20240101000000, 20240102000000]);
            let ours: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox_schema_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(
                ours,
                outbox::$module::MIGRATOR
                    .iter()
                    .map(|m| m.version)
                    .collect::<Vec<_>>()
            );
            // The outbox schema, the inbox's (0002_inbox.sql), the source id (0003_outbox_source.sql).
            assert_eq!(ours, vec![1, 2, 3]);
            // Both schemas are usable in one transaction.
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO orders (id, note) VALUES (1, 'x')")
                .execute(&mut *tx)
                .await
                .unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "x")).await.unwrap();
            tx.commit().await.unwrap();
            std::fs::remove_dir_all(dir).ok();
        }

        #[tokio::test]
        async fn concurrent_migrations_do_not_conflict() {
            let pool = outbox_tests::db::$fresh_unmigrated().await;
            let runs = (0..4).map(|_| outbox::$module::migrate(&pool));
            for r in futures::future::join_all(runs).await {
                r.unwrap();
            }
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_schema_migrations")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(n, outbox::$module::MIGRATOR.iter().count() as i64);
        }

        #[tokio::test]
        async fn lease_rows_match_the_lane_count_and_there_is_no_listen() {
            let pool = outbox_tests::db::$fresh().await;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_leases")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(n, outbox::LANES as i64);
            assert!(
                $store::new(pool).wakeups().is_none(),
                "the relay polls this database"
            );
        }

        #[tokio::test]
        async fn kept_published_rows_carry_partition_and_offset_and_are_cleaned_up() {
            let pool = outbox_tests::db::$fresh().await;
            let store = $store::new(pool.clone()).keep_published(true);
            let mut tx = pool.begin().await.unwrap();
            let msgs: Vec<Message> = (0..3)
                .map(|i| Message::new("t", format!("{i}")).key("k"))
                .collect();
            outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
            tx.commit().await.unwrap();
            let leases = take_all(&store, OWNER).await;
            let rows = claim_all(&store, &leases).await;
            publish(&store, &leases, &rows).await;
            // Marking again (a duplicate delivery report) changes nothing.
            publish(&store, &leases, &rows).await;
            assert_eq!(store.status().await.unwrap().pending, 0);
            let kept: Vec<($key, i32, i64)> = sqlx::query_as($kept_sql).fetch_all(&pool).await.unwrap();
            assert_eq!(kept, vec![($k, 3, 1), ($k, 3, 2), ($k, 3, 3)]);
            assert_eq!(
                store
                    .cleanup_published(Duration::from_secs(3600), 10)
                    .await
                    .unwrap(),
                0
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(store.cleanup_published(Duration::ZERO, 2).await.unwrap(), 2);
            assert_eq!(store.cleanup_published(Duration::ZERO, 2).await.unwrap(), 1);
        }

        #[tokio::test]
        async fn batches_larger_than_one_statement_keep_per_key_order() {
            let pool = outbox_tests::db::$fresh().await;
            big_batch(&pool, &$store::new(pool.clone())).await;
        }
    };
}

mod mysql {
    use super::*;

    other_db_suite!(
        mysql,
        MySqlStore,
        fresh_mysql,
        fresh_mysql_unmigrated,
        "SELECT `key`, kafka_partition, kafka_offset FROM outbox_published ORDER BY seq",
        Vec<u8>,
        b"k".to_vec()
    );

    #[tokio::test]
    async fn batch_seqs_are_current_even_when_the_transaction_snapshot_is_older() {
        let pool = outbox_tests::db::fresh_mysql().await;
        let mut old = pool.begin().await.unwrap();
        // REPEATABLE READ: this read fixes the transaction's snapshot.
        let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_keys")
            .fetch_one(&mut *old)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        let msgs = [Message::new("t", "a").key("a"), Message::new("t", "b").key("b")];
        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        let out = outbox::enqueue_batch(&mut old, &msgs).await.unwrap();
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![Some(3), Some(3)]);
        let one = outbox::enqueue(&mut old, &Message::new("t", "a").key("a"))
            .await
            .unwrap();
        assert_eq!(one.seq, Some(4));
        old.commit().await.unwrap();
    }

    #[tokio::test]
    async fn keys_are_compared_byte_for_byte_and_may_be_long() {
        let pool = outbox_tests::db::fresh_mysql().await;
        let long = "x".repeat(5000);
        let keys = ["k", "k ", "K", long.as_str()];
        let mut tx = pool.begin().await.unwrap();
        for k in keys {
            let e = outbox::enqueue(&mut tx, &Message::new("t", "1").key(k)).await.unwrap();
            assert_eq!(e.seq, Some(1), "{k:?} has a counter of its own");
        }
        let e = outbox::enqueue(&mut tx, &Message::new("t", "2").key(long.as_str()))
            .await
            .unwrap();
        assert_eq!(e.seq, Some(2));
        tx.commit().await.unwrap();
        let store = MySqlStore::new(pool);
        let leases = take_all(&store, OWNER).await;
        let rows = claim_all(&store, &leases).await;
        assert_eq!(rows.len(), 5);
        assert_eq!(
            rows.iter().filter(|r| r.key.as_deref() == Some(long.as_str())).count(),
            2
        );
    }
}

mod sqlite {
    use super::*;

    other_db_suite!(
        sqlite,
        SqliteStore,
        fresh_sqlite,
        fresh_sqlite_unmigrated,
        "SELECT key, kafka_partition, kafka_offset FROM outbox_published ORDER BY seq",
        String,
        "k".to_owned()
    );

    #[tokio::test]
    async fn in_memory_database_works_through_a_one_connection_pool() {
        let pool = outbox_tests::db::fresh_sqlite_memory().await;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::new(pool.clone()));
        let mut tx = pool.begin().await.unwrap();
        let e = outbox::enqueue(&mut tx, &Message::new("t", "x").key("k"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let leases = take_all(&*store, OWNER).await;
        let rows = claim_all(&*store, &leases).await;
        assert_eq!((rows.len(), rows[0].id, rows[0].seq), (1, e.id, Some(1)));
    }
}

/// Whether the write path and the inbox both call `e` worth trying again.
fn retryable(e: sqlx::Error) -> (bool, bool) {
    let inbox = outbox_inbox::InboxError::<std::convert::Infallible>::Database(e);
    let transient = inbox.is_retryable();
    let outbox_err = match inbox {
        outbox_inbox::InboxError::Database(e) => outbox::Error::Database(e),
        _ => unreachable!(),
    };
    (outbox_err.is_retryable(), transient)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_deadlock_and_lock_wait_timeout_are_retryable_other_errors_are_not() {
    let pool = outbox_tests::db::fresh_mysql().await;
    sqlx::query("CREATE TABLE acct (id INT PRIMARY KEY, n INT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO acct VALUES (1, 0), (2, 0)")
        .execute(&pool)
        .await
        .unwrap();

    // A real deadlock: two transactions lock the rows in opposite orders.
    let (mut a, mut b) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
    sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 1")
        .execute(&mut *a)
        .await
        .unwrap();
    sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 2")
        .execute(&mut *b)
        .await
        .unwrap();
    let second = tokio::spawn(async move {
        let r = sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 1")
            .execute(&mut *b)
            .await;
        (r.map(|_| ()), b)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 2")
        .execute(&mut *a)
        .await
        .map(|_| ());
    let (second, b) = second.await.unwrap();
    let deadlock = first
        .err()
        .or(second.err())
        .expect("one of the two is the deadlock victim");
    assert!(
        deadlock.to_string().contains("1213") || deadlock.to_string().to_lowercase().contains("deadlock"),
        "{deadlock}"
    );
    assert_eq!(retryable(deadlock), (true, true), "a deadlock is worth another try");
    drop((a, b));

    // A lock wait timeout (1205, SQLSTATE HY000).
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 1")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut waiter = pool.acquire().await.unwrap();
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut *waiter)
        .await
        .unwrap();
    let timeout = sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 1")
        .execute(&mut *waiter)
        .await
        .expect_err("lock wait timeout");
    assert_eq!(
        retryable(timeout),
        (true, true),
        "a lock wait timeout is worth another try"
    );
    holder.rollback().await.unwrap();

    // Errors that fail the same way every time, whatever their SQLSTATE (1062: 23000; 1366: HY000).
    let dup = sqlx::query("INSERT INTO acct VALUES (1, 0)")
        .execute(&pool)
        .await
        .expect_err("duplicate key");
    assert_eq!(retryable(dup), (false, false));
    let bad = sqlx::query("INSERT INTO acct VALUES (3, 'not a number')")
        .execute(&pool)
        .await
        .expect_err("bad value");
    assert_eq!(
        retryable(bad),
        (false, false),
        "HY000 alone does not make an error transient"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_busy_snapshot_is_retryable() {
    let pool = outbox_tests::db::fresh_sqlite().await;
    sqlx::query("CREATE TABLE acct (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO acct VALUES (1, 0)")
        .execute(&pool)
        .await
        .unwrap();
    // WAL: a reader's snapshot predates a commit by another connection; its upgrade to a writer
    // then fails with SQLITE_BUSY_SNAPSHOT (517).
    let mut reader = pool.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT n FROM acct WHERE id = 1")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let busy = sqlx::query("UPDATE acct SET n = n + 1 WHERE id = 1")
        .execute(&mut *reader)
        .await
        .expect_err("busy snapshot");
    let code = match &busy {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some("517"), "{busy}");
    assert_eq!(retryable(busy), (true, true), "a busy snapshot is worth another try");
}
