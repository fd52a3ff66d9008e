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
