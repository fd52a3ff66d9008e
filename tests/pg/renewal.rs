//! The lease renewal and the marks do not wait for each other: a mark held up on one lane holds
//! up neither the renewal of every lane nor the marks of the others.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox::{Delivered, Lease, Message, Store};
use outbox_tests::db::commit_each;

/// Long enough for a statement that waits for nothing on a slow machine, far shorter than the
/// transaction that holds up the first mark.
const PROMPT: Duration = Duration::from_secs(10);

/// A transaction of another session that holds the outbox row (`lane`, `pos`) locked until it ends.
async fn hold_row(pool: &sqlx::PgPool, lane: i32, pos: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM outbox_messages WHERE lane = $1 AND pos = $2 FOR UPDATE")
        .bind(lane)
        .bind(pos)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

#[tokio::test]
async fn a_mark_held_up_on_one_lane_holds_up_neither_the_renewal_nor_the_other_lanes_marks() {
    let pool = outbox_tests::db::fresh_pg().await;
    commit_each(&pool, (0..8).map(|i| Message::new("t", "x").key(format!("key-{i}")))).await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let ttl = Duration::from_secs(60);
    let leases: BTreeMap<i32, Lease> = store
        .acquire("relay", 64, ttl)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.lane, l))
        .collect();
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT lane, min(pos) FROM outbox_messages GROUP BY lane ORDER BY lane")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(rows.len() >= 2, "the keys fall on one lane: {rows:?}");
    // The last lane's mark is held up: the renewal, which takes the leases in lane order, has every
    // other lane's by the time it reaches that one.
    let ((first_lane, first_pos), (last_lane, last_pos)) = (rows[0], rows[rows.len() - 1]);

    // A session that holds the last lane's row (an operator's query, a slow disk under the mark:
    // anything that keeps a mark running).
    let holder = hold_row(&pool, last_lane, last_pos).await;
    let held_mark = {
        let (store, lease) = (store.clone(), leases[&last_lane].clone());
        tokio::spawn(async move { store.mark_published(&lease, &[Delivered::new(last_pos)]).await })
    };
    // The mark waits for the held row.
    super::statements_waiting(&pool, 1, PROMPT).await;

    let renewed = tokio::time::timeout(PROMPT, store.renew("relay", ttl)).await;
    let renewed = renewed
        .expect("the renewal waited for a mark held up on one lane's row")
        .unwrap();
    assert_eq!(renewed.len(), leases.len(), "every lease renewed");
    let other = tokio::time::timeout(
        PROMPT,
        store.mark_published(&leases[&first_lane], &[Delivered::new(first_pos)]),
    )
    .await;
    other.expect("another lane's mark waited for the held one").unwrap();
    assert!(!held_mark.is_finished(), "the held mark waits for the row");

    holder.commit().await.unwrap();
    held_mark
        .await
        .unwrap()
        .expect("the held mark ends once the row is free");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_messages WHERE pos IN ($1, $2)")
        .bind(first_pos)
        .bind(last_pos)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "both marks deleted their rows");
}

/// A failure mark or a dead letter checks its lease the way a mark does, but locks it (so that no
/// takeover comes between the check and the write): it took the lease's lock first and then waited
/// for the held row with it, and the renewal, which locks every lease of its relay, waited behind
/// it: every lease could expire over one row held up. The row is now locked first, the lease
/// after it.
#[tokio::test]
async fn a_failure_mark_or_a_dead_letter_held_up_on_a_row_does_not_hold_up_the_renewal() {
    for dead_letter in [false, true] {
        let pool = outbox_tests::db::fresh_pg().await;
        commit_each(&pool, [Message::new("t", "x").key("k")]).await;
        let store = outbox::postgres::PgStore::new(pool.clone());
        let ttl = Duration::from_secs(60);
        let leases = store.acquire("relay", 64, ttl).await.unwrap();
        let (lane, pos): (i32, i64) = sqlx::query_as("SELECT lane, pos FROM outbox_messages")
            .fetch_one(&pool)
            .await
            .unwrap();
        let lease = leases.iter().find(|l| l.lane == lane).unwrap().clone();
        let holder = hold_row(&pool, lane, pos).await;
        let held = {
            let store = store.clone();
            tokio::spawn(async move {
                match dead_letter {
                    true => store.dead_letter(&lease, pos, "refused", false).await,
                    false => {
                        store
                            .mark_failed(&lease, pos, "timed out", Duration::from_secs(1))
                            .await
                    }
                }
            })
        };
        super::statements_waiting(&pool, 1, PROMPT).await;
        let renewed = tokio::time::timeout(PROMPT, store.renew("relay", ttl))
            .await
            .unwrap_or_else(|_| panic!("the renewal waited for a held-up {}", what(dead_letter)))
            .unwrap();
        assert_eq!(renewed.len(), leases.len(), "every lease renewed");
        holder.commit().await.unwrap();
        held.await.unwrap().unwrap();
        let (left, dead): (i64, i64) =
            sqlx::query_as("SELECT (SELECT count(*) FROM outbox_messages), (SELECT count(*) FROM outbox_dead_letters)")
                .fetch_one(&pool)
                .await
                .unwrap();
        let expected = if dead_letter { (0, 1) } else { (1, 0) };
        assert_eq!((left, dead), expected, "the {} did its write", what(dead_letter));
    }
}

fn what(dead_letter: bool) -> &'static str {
    if dead_letter {
        "dead letter"
    } else {
        "failure mark"
    }
}
