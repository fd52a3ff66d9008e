//! Lanes that claim, or mark, at the same moment share one statement, and each gets its own answer:
//! its own rows, its own lease checked.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox::{Delivered, Error, Lease, Message, Store, StoredMessage};
use outbox_tests::db::commit_each;

/// Transactions committed in `db`, counted by `reader` (a connection to another database, so
/// its own reads count elsewhere) once `one`, the only connection left on `db`, has flushed its
/// counts. The flush's own transaction counts too.
async fn commits(one: &sqlx::PgPool, reader: &sqlx::PgPool, db: &str) -> i64 {
    let read = || async {
        sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(db)
            .fetch_one(reader)
            .await
            .unwrap()
    };
    let was = read().await;
    outbox_tests::db::exec(one, "SELECT pg_stat_force_next_flush()").await;
    // The connection flushes as it goes idle, a moment after it answered.
    outbox_tests::wait::until("the counts flushed", Duration::from_secs(5), || async {
        let now = read().await;
        (now > was).then_some(now).ok_or_else(|| format!("still {now}"))
    })
    .await
}

#[tokio::test]
async fn lanes_that_claim_and_mark_at_once_share_a_statement_and_get_their_own_rows() {
    let first_pool = outbox_tests::db::fresh_pg().await;
    // One connection on the database: what the store runs goes through it, and its counts tell
    // the statements. The rest is closed (a closing connection reports its counts at once).
    let options = (*first_pool.connect_options()).clone();
    first_pool.close().await;
    let db = options.get_database().expect("a database").to_owned();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .unwrap();
    let reader = sqlx::PgPool::connect_with(options.database("postgres")).await.unwrap();
    let keys: Vec<String> = (0..8).map(|i| format!("key-{i}")).collect();
    commit_each(
        &pool,
        keys.iter()
            .flat_map(|k| (0..4).map(move |i| Message::new("t", format!("{k}/{i}")).key(k.as_str()))),
    )
    .await;
    let store = outbox::postgres::PgStore::new(pool.clone()).keep_published(true);
    let leases: BTreeMap<i32, Lease> = store
        .acquire("relay", 64, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.lane, l))
        .collect();
    let lanes: Vec<i32> = {
        let mut l: Vec<i32> = keys
            .iter()
            .map(|k| outbox::lane_of(Some(k), uuid::Uuid::nil(), outbox::LANES))
            .collect();
        l.sort();
        l.dedup();
        l
    };
    assert!(lanes.len() >= 4, "the keys fall on {lanes:?}");
    // Each lane's first row is in flight; one more claim holds a lease of an earlier epoch.
    let first: BTreeMap<i32, i64> = sqlx::query_as("SELECT lane, min(pos) FROM outbox_messages GROUP BY lane")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut stale = leases[&lanes[0]].clone();
    stale.epoch -= 1;

    let before = commits(&pool, &reader, &db).await;
    let in_flight: Vec<[i64; 1]> = lanes.iter().map(|lane| [first[lane]]).collect();
    let claims = lanes
        .iter()
        .zip(&in_flight)
        .map(|(lane, in_flight)| store.claim(&leases[lane], 100, in_flight));
    let (claimed, stale_claim) = tokio::join!(futures::future::join_all(claims), store.claim(&stale, 100, &[]));
    let after_claims = commits(&pool, &reader, &db).await;
    assert!(stale_claim.unwrap().is_empty(), "a stale lease claims nothing");
    let claimed: Vec<Vec<StoredMessage>> = claimed.into_iter().map(Result::unwrap).collect();
    for (lane, rows) in lanes.iter().zip(&claimed) {
        let want: Vec<i64> =
            sqlx::query_scalar("SELECT pos FROM outbox_messages WHERE lane = $1 AND pos <> $2 ORDER BY pos")
                .bind(lane)
                .bind(first[lane])
                .fetch_all(&pool)
                .await
                .unwrap();
        let got: Vec<i64> = rows.iter().map(|r| r.pos).collect();
        assert_eq!(
            got, want,
            "lane {lane}: its own rows, in order, without the one in flight"
        );
        assert!(rows.iter().all(|r| r.lane == *lane));
    }

    // The marks: every lane's rows, each confirmed at its own partition and offset; the stale
    // lease's mark is refused and leaves its lane's rows alone.
    let marks = lanes.iter().zip(&claimed).map(|(lane, rows)| {
        let done: Vec<Delivered> = rows
            .iter()
            .map(|r| Delivered::new(r.pos).at(*lane, r.pos * 10))
            .collect();
        let lease = leases[lane].clone();
        let store = store.clone();
        async move { store.mark_published(&lease, &done).await }
    });
    let stale_done = [Delivered::new(first[&lanes[0]]).at(0, 0)];
    let before_marks = commits(&pool, &reader, &db).await;
    let (marked, stale_mark) = tokio::join!(
        futures::future::join_all(marks),
        store.mark_published(&stale, &stale_done)
    );
    let after_marks = commits(&pool, &reader, &db).await;
    for m in marked {
        m.unwrap();
    }
    assert!(
        matches!(stale_mark, Err(Error::StaleLease { lane, .. }) if lane == lanes[0]),
        "{stale_mark:?}"
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT pos FROM outbox_messages ORDER BY pos")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut firsts: Vec<i64> = lanes.iter().map(|l| first[l]).collect();
    firsts.sort();
    assert_eq!(left, firsts, "the rows in flight stay, every other row is marked");
    let kept: Vec<(i32, i64, i64)> =
        sqlx::query_as("SELECT p.kafka_partition, p.kafka_offset, count(*) FROM outbox_published p GROUP BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kept.len(), claimed.iter().map(Vec::len).sum::<usize>());
    assert!(kept
        .iter()
        .all(|(part, off, n)| *n == 1 && lanes.contains(part) && off % 10 == 0));

    // Each statement is one transaction (the claims: BEGIN, SET LOCAL jit, claim, COMMIT); the
    // count read after it is one more.
    // A count can miss the flush's own transaction when the connection reported on its own first:
    // one more or less.
    let (claim_xacts, mark_xacts) = (after_claims - before - 1, after_marks - before_marks - 1);
    eprintln!(
        "{} claims took {claim_xacts} transactions, {} marks {mark_xacts}",
        lanes.len() + 1,
        lanes.len() + 1
    );
    assert!(
        claim_xacts <= 3 && mark_xacts <= 3,
        "{} lanes at once: claims took {claim_xacts} transactions, marks {mark_xacts}",
        lanes.len() + 1
    );
}
