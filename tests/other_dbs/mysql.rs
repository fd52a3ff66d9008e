//! MySQL/MariaDB: the shared scenarios, batch seqs against an older snapshot, keys compared byte
//! for byte.

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

/// Long keys count in the statements' byte budget: 500 keys of 40,000 bytes made a counter
/// statement of 40 MB (each key bound twice) and a row statement of 20 MB, past MariaDB's 16 MiB
/// `max_allowed_packet`, and the batch was refused every time.
#[tokio::test]
async fn a_batch_of_many_long_keys_is_split_into_statements_the_server_takes() {
    let pool = outbox_tests::db::fresh_mysql().await;
    let msgs: Vec<Message> = (0..500)
        .map(|i| Message::new("t", "x").key(format!("{i:05}{}", "k".repeat(40_000))))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let out = outbox::enqueue_batch(&mut tx, &msgs).await.expect("500 long keys");
    tx.commit().await.unwrap();
    assert!(out.iter().all(|e| e.seq == Some(1)));
    let rows: i64 = outbox_tests::db::scalar(&pool, "SELECT count(*) FROM outbox_messages").await;
    assert_eq!(rows, 500);
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
