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
    // Dead-lettered, it shows in the list (which failed on it) with its key as far as it is text.
    let lease = leases.iter().find(|l| l.lane == bad.lane).unwrap();
    store.dead_letter(lease, bad.pos, "corrupt", false).await.unwrap();
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key.as_deref(), Some("\u{fffd}\0"), "{dead:?}");
    let good = rows.iter().find(|r| r.id == sent[1].id).expect("the good row claimed");
    assert_eq!((good.key.as_deref(), good.corrupt.as_deref()), (Some("k2"), None));
}

/// The same for every other column a claim reads: a row another writer stored with a text id, a
/// BLOB topic or headers, a text seq, attempts or created_at failed the whole claim of its lane on
/// every try; a text available_at was never due and held every later message of its key for ever.
/// Each such row is now claimed and marked corrupt, naming its column; a payload stored as a number
/// is sent as its text, and a REAL created_at is read as the microseconds it holds.
#[tokio::test]
async fn a_row_whose_columns_hold_foreign_types_is_marked_corrupt_not_the_claim_failed() {
    let pool = outbox_tests::db::fresh_sqlite().await;
    let store = SqliteStore::new(pool.clone());
    let sent = outbox_tests::db::commit_batch(
        &pool,
        &[
            Message::new("t", "id").key("k1"),
            Message::new("t", "topic").key("k2"),
            Message::new("t", "seq").key("k3"),
            Message::new("t", "created_at").key("k4"),
            Message::new("t", "headers").key("k5"),
            Message::new("t", "attempts").key("k6"),
            Message::new("t", "available_at").key("k7"),
            Message::new("t", "after available_at").key("k7"),
            Message::new("t", "payload").key("k8"),
            Message::new("t", "real created_at").key("k9"),
            Message::new("t", "good").key("k10"),
        ],
    )
    .await;
    let foreign = [
        (
            0,
            "UPDATE outbox_messages SET id = '00000000-0000-0000-0000-000000000001' WHERE id = ?",
        ),
        (1, "UPDATE outbox_messages SET topic = x'ff00' WHERE id = ?"),
        (2, "UPDATE outbox_messages SET seq = 'first' WHERE id = ?"),
        (3, "UPDATE outbox_messages SET created_at = 'yesterday' WHERE id = ?"),
        (4, "UPDATE outbox_messages SET headers = x'00ff' WHERE id = ?"),
        (5, "UPDATE outbox_messages SET attempts = 'none' WHERE id = ?"),
        (6, "UPDATE outbox_messages SET available_at = 'soon' WHERE id = ?"),
        (8, "UPDATE outbox_messages SET payload = 42 WHERE id = ?"),
        (
            9,
            "UPDATE outbox_messages SET created_at = created_at + 0.5 WHERE id = ?",
        ),
    ];
    for (i, update) in foreign {
        let n = sqlx::query(update)
            .bind(sent[i].id)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(n, 1, "{update}");
    }
    let leases = take_all(&store, OWNER).await;
    let rows = claim_all(&store, &leases).await;
    let by_payload = |p: &str| {
        rows.iter()
            .find(|r| r.payload == p.as_bytes())
            .unwrap_or_else(|| panic!("the row {p:?} not claimed: {rows:?}"))
    };
    for column in [
        "id",
        "topic",
        "seq",
        "created_at",
        "headers",
        "attempts",
        "available_at",
    ] {
        let row = by_payload(column);
        assert!(
            row.corrupt
                .as_deref()
                .is_some_and(|c| c.contains(&format!("{column} column"))),
            "{row:?}"
        );
    }
    for good in ["after available_at", "42", "real created_at", "good"] {
        let row = by_payload(good);
        assert_eq!(row.corrupt, None, "{row:?}");
    }
    let drift = by_payload("real created_at").created_at - by_payload("good").created_at;
    assert!(drift.num_seconds().abs() < 60, "{drift}");
    assert_eq!(rows.len(), 11, "{rows:?}");

    // The relay dead-letters them; the dead letters list (it failed on a key that is not text) and
    // each can be discarded by its id (the text id got a new one).
    for row in rows.iter().filter(|r| r.corrupt.is_some()) {
        let lease = leases.iter().find(|l| l.lane == row.lane).unwrap();
        store
            .dead_letter(lease, row.pos, row.corrupt.as_deref().unwrap(), false)
            .await
            .unwrap();
    }
    let dead = store.dead_letters(100).await.unwrap();
    assert_eq!(dead.len(), 7, "{dead:?}");
    assert!(dead.iter().any(|d| d.topic == "\u{fffd}\0"), "{dead:?}");
    for d in &dead {
        assert!(store.discard_dead_letter(d.id).await.unwrap(), "{d:?}");
    }
    assert_eq!(store.dead_letters(100).await.unwrap().len(), 0);
}
