//! The inbox's gap handling on SQLite, the cases of `tests/inbox.rs` (which runs them on PostgreSQL):
//! a skipped message arriving late is processed once, only seqs inside a gap are new below the
//! highest, a gap fills in any order, concurrent deliveries apply it once, expired gaps are cleaned
//! up. Run with `cargo test -p outbox-inbox --features sqlite --test sqlite`.
#![cfg(feature = "sqlite")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_inbox::{GapPolicy, Handler, Inbox, Incoming, Outcome};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

/// A new SQLite database file (WAL, writers wait for each other), migrated, with the business table.
async fn pool() -> SqlitePool {
    let path = std::env::temp_dir().join(format!("outbox_inbox_test_{}.db", Uuid::new_v4().simple()));
    let opts: SqliteConnectOptions = format!("sqlite://{}?mode=rwc", path.display()).parse().unwrap();
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(
            opts.journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    outbox::sqlite::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE effects (n INTEGER PRIMARY KEY, message_id BLOB NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

/// Inserts one effect row, optionally sleeping inside the transaction to widen race windows.
#[derive(Default)]
struct Effect {
    calls: AtomicUsize,
    sleep: Duration,
}

#[async_trait]
impl Handler<Sqlite> for Effect {
    type Error = sqlx::Error;

    async fn handle(&self, tx: &mut Transaction<'_, Sqlite>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO effects (message_id) VALUES (?1)")
            .bind(msg.id)
            .execute(&mut **tx)
            .await?;
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        Ok(())
    }
}

fn keyed(key: &'static str, seq: i64) -> Incoming<'static> {
    Incoming::new(Uuid::now_v7(), "orders", b"payload").keyed(key, seq)
}

async fn deliver(inbox: &Inbox, pool: &SqlitePool, handler: &Effect, key: &'static str, seq: i64) -> Outcome {
    inbox.process(pool, &keyed(key, seq), handler).await.unwrap()
}

async fn effects(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn effects_of(pool: &SqlitePool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = ?1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn gaps(pool: &SqlitePool, key: &str) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT from_seq, to_seq FROM outbox_inbox_gaps WHERE consumer = 'c' AND key = ?1 ORDER BY from_seq")
        .bind(key)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn gap_from(pool: &SqlitePool, key: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT gap_from FROM outbox_inbox_keys WHERE consumer = 'c' AND key = ?1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn key_seq(pool: &SqlitePool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT seq FROM outbox_inbox_keys WHERE consumer = 'c' AND key = ?1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_skipped_message_arriving_late_is_processed_once_and_only_it() {
    let pool = pool().await;
    let inbox = Inbox::new("c");
    let handler = Effect::default();
    for seq in [1, 2, 4, 5] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, "k").await, [(3, 3)]);
    assert_eq!(gap_from(&pool, "k").await, Some(3));
    let late = keyed("k", 3);
    assert_eq!(inbox.process(&pool, &late, &handler).await.unwrap(), Outcome::Processed);
    assert_eq!(effects_of(&pool, late.id).await, 1);
    assert_eq!(gaps(&pool, "k").await, []);
    assert_eq!(gap_from(&pool, "k").await, None);
    assert_eq!(key_seq(&pool, "k").await, 5);
    assert_eq!(inbox.process(&pool, &late, &handler).await.unwrap(), Outcome::Duplicate);
    for seq in [3, 1, 2, 4, 5] {
        assert_eq!(
            deliver(&inbox, &pool, &handler, "k", seq).await,
            Outcome::Duplicate,
            "seq {seq}"
        );
    }
    assert_eq!(effects(&pool).await, 5);
}

#[tokio::test]
async fn only_seqs_inside_a_gap_are_new_below_the_highest() {
    let pool = pool().await;
    let inbox = Inbox::new("c");
    let handler = Effect::default();
    for seq in [1, 2, 3, 6, 7, 10] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, "k").await, [(4, 5), (8, 9)]);
    for seq in [1, 3, 6, 7, 10] {
        assert_eq!(
            deliver(&inbox, &pool, &handler, "k", seq).await,
            Outcome::Duplicate,
            "seq {seq}"
        );
    }
    for seq in [5, 4] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
    assert_eq!(gaps(&pool, "k").await, [(8, 9)]);
    assert_eq!(gap_from(&pool, "k").await, Some(8));
    // A key first seen above 1 can still get its beginning.
    assert_eq!(deliver(&inbox, &pool, &handler, "late", 3).await, Outcome::Processed);
    assert_eq!(gaps(&pool, "late").await, [(1, 2)]);
    assert_eq!(deliver(&inbox, &pool, &handler, "late", 1).await, Outcome::Processed);
    assert_eq!(deliver(&inbox, &pool, &handler, "late", 1).await, Outcome::Duplicate);
    assert_eq!(gaps(&pool, "late").await, [(2, 2)]);
    assert_eq!(effects(&pool).await, 10);
}

#[tokio::test]
async fn a_gap_of_several_seqs_is_filled_in_any_order() {
    let pool = pool().await;
    let inbox = Inbox::new("c");
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
            let mut runs: Vec<(i64, i64)> = Vec::new();
            for &s in &missing {
                match runs.last_mut() {
                    Some((_, to)) if *to + 1 == s => *to = s,
                    _ => runs.push((s, s)),
                }
            }
            assert_eq!(gaps(&pool, key).await, runs, "{key} after {seq}");
            assert_eq!(
                gap_from(&pool, key).await,
                runs.first().map(|r| r.0),
                "{key} after {seq}"
            );
        }
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
async fn concurrent_deliveries_of_a_skipped_message_apply_it_once() {
    let pool = pool().await;
    let inbox = Inbox::new("c");
    let handler = Arc::new(Effect {
        sleep: Duration::from_millis(50),
        ..Effect::default()
    });
    for seq in [1, 3, 9, 12] {
        assert_eq!(deliver(&inbox, &pool, &handler, "k", seq).await, Outcome::Processed);
    }
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
    assert_eq!(gaps(&pool, "k").await, [(4, 5), (7, 8), (11, 11)]);
    assert_eq!(effects(&pool).await, 4 + 3);
}

#[tokio::test]
async fn hold_records_no_gap_and_cleanup_deletes_expired_ones() {
    let pool = pool().await;
    let handler = Effect::default();
    let hold = Inbox::new("c").gap_policy(GapPolicy::Hold);
    assert_eq!(deliver(&hold, &pool, &handler, "held", 1).await, Outcome::Processed);
    assert_eq!(deliver(&hold, &pool, &handler, "held", 3).await, Outcome::Held);
    assert_eq!(gaps(&pool, "held").await, []);
    assert_eq!(gap_from(&pool, "held").await, None);

    let inbox = Inbox::new("c").retention(Duration::from_secs(24 * 60 * 60));
    for (key, seqs) in [("old", [1, 5]), ("recent", [1, 4])] {
        for seq in seqs {
            assert_eq!(deliver(&inbox, &pool, &handler, key, seq).await, Outcome::Processed);
        }
    }
    // Two days back, in microseconds.
    sqlx::query("UPDATE outbox_inbox_gaps SET created_at = created_at - 172800000000 WHERE key = 'old'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(inbox.cleanup(&pool, 100).await.unwrap(), 1);
    assert_eq!(gaps(&pool, "old").await, []);
    assert_eq!(gaps(&pool, "recent").await, [(2, 3)]);
    // Past the window a skipped message is taken for a duplicate, and gap_from is repaired.
    assert_eq!(deliver(&inbox, &pool, &handler, "old", 3).await, Outcome::Duplicate);
    assert_eq!(gap_from(&pool, "old").await, None);
    assert_eq!(deliver(&inbox, &pool, &handler, "recent", 3).await, Outcome::Processed);
    assert_eq!(effects(&pool).await, 1 + 2 + 2 + 1);
}
