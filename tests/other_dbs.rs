//! MySQL/MariaDB- and SQLite-specific behaviour: migrations beside the application's own sqlx
//! migrator, concurrent migrations, the audit trail of published rows, batches larger than one
//! statement, and keys compared byte for byte. The scenarios both databases share are written once
//! (`other_db_suite!`, and the helpers in `other_dbs/scenarios.rs`); each database's module adds its
//! own. Below them: which of their errors are worth trying again.

use std::sync::Arc;
use std::time::Duration;

use outbox::{Message, Store, StoreAdmin};
use outbox_tests::conformance::{claim_all, take_all, OWNER};

#[path = "other_dbs/scenarios.rs"]
mod scenarios;

use scenarios::{big_batch, publish, writers_and_a_relay};

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

        // The outbox schema, the inbox's (0002_inbox.sql), the source id (0003_outbox_source.sql).
        outbox_tests::migration_tests!($module, $fresh_unmigrated, vec![1, 2, 3]);

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
            let msgs: Vec<Message> = (0..3)
                .map(|i| Message::new("t", format!("{i}")).key("k"))
                .collect();
            outbox_tests::db::commit_batch(&pool, &msgs).await;
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

#[path = "other_dbs/mysql.rs"]
mod mysql;
#[path = "other_dbs/sqlite.rs"]
mod sqlite;

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
    outbox_tests::db::exec(&pool, "CREATE TABLE acct (id INT PRIMARY KEY, n INT NOT NULL)").await;
    outbox_tests::db::exec(&pool, "INSERT INTO acct VALUES (1, 0), (2, 0)").await;

    // A real deadlock: two transactions lock the rows in opposite orders.
    let (mut a, mut b) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
    outbox_tests::db::exec(&mut *a, "UPDATE acct SET n = n + 1 WHERE id = 1").await;
    outbox_tests::db::exec(&mut *b, "UPDATE acct SET n = n + 1 WHERE id = 2").await;
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
    outbox_tests::db::exec(&mut *holder, "UPDATE acct SET n = n + 1 WHERE id = 1").await;
    let mut waiter = pool.acquire().await.unwrap();
    outbox_tests::db::exec(&mut *waiter, "SET SESSION innodb_lock_wait_timeout = 1").await;
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
    outbox_tests::db::exec(&pool, "CREATE TABLE acct (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)").await;
    outbox_tests::db::exec(&pool, "INSERT INTO acct VALUES (1, 0)").await;
    // WAL: a reader's snapshot predates a commit by another connection; its upgrade to a writer
    // then fails with SQLITE_BUSY_SNAPSHOT (517).
    let mut reader = pool.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT n FROM acct WHERE id = 1")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    outbox_tests::db::exec(&pool, "UPDATE acct SET n = n + 1 WHERE id = 1").await;
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
