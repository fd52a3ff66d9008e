//! SQLite: the shared scenarios, and an in-memory database through a one-connection pool.

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

/// SQLite keeps whatever type a writer gives a column: a key written as a BLOB (or as text that is
/// not UTF-8) by something other than this crate failed the whole claim of its lane on every try,
/// so every key of the lane waited. Now the row is marked corrupt (the relay dead-letters it) and
/// the rest of the lane is claimed.
#[tokio::test]
async fn a_key_stored_as_bytes_that_are_not_text_marks_its_row_corrupt_not_the_claim_failed() {
    let pool = outbox_tests::db::fresh_sqlite().await;
    let store = SqliteStore::new(pool.clone());
    let sent = outbox_tests::db::commit_batch(
        &pool,
        &[Message::new("t", "bad").key("k1"), Message::new("t", "good").key("k2")],
    )
    .await;
    sqlx::query("UPDATE outbox_messages SET key = x'ff00' WHERE id = ?")
        .bind(sent[0].id)
        .execute(&pool)
        .await
        .unwrap();
    let leases = take_all(&store, OWNER).await;
    let rows = claim_all(&store, &leases).await;
    let bad = rows.iter().find(|r| r.id == sent[0].id).expect("the bad row claimed");
    assert!(
        bad.corrupt.as_deref().is_some_and(|c| c.contains("key column")),
        "{bad:?}"
    );
    let good = rows.iter().find(|r| r.id == sent[1].id).expect("the good row claimed");
    assert_eq!((good.key.as_deref(), good.corrupt.as_deref()), (Some("k2"), None));
}
