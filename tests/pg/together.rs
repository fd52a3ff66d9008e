//! Lanes that claim, or mark, at the same moment share one statement, and each gets its own answer:
//! its own rows, its own lease checked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::{Delivered, Error, Lease, Message, Store, StoredMessage};
use outbox_tests::db::commit_each;

/// Counts the statements sqlx runs on this thread: it reports each one, as it ends, in an event of
/// target `sqlx::query`. The test's runtime has one thread, so the store's tasks run on it too.
#[derive(Clone, Default)]
struct Statements(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Statements {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn lanes_that_claim_and_mark_at_once_share_a_statement_and_get_their_own_rows() {
    let pool = outbox_tests::db::fresh_pg().await;
    let statements = Statements::default();
    let _counting = tracing::subscriber::set_default(tracing_subscriber::layer::SubscriberExt::with(
        tracing_subscriber::registry(),
        statements.clone(),
    ));
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

    // The store's counts of its own statements' transactions: (those that write, all).
    let counted = || async {
        let probe = store.probe().await.unwrap();
        let writes = probe.own_writes.expect("PgStore counts its writes");
        (writes, probe.own_finished.expect("PgStore counts its transactions"))
    };
    let finished_before = counted().await.1;
    // Other tests of this binary run sqlx statements on other threads while this one sets its
    // subscriber: a callsite they registered at that moment may have cached "nobody listens"
    // (CI saw 0 statements counted). By now every `sqlx::query` callsite is registered; this
    // asks each again, with this thread's subscriber among those that listen.
    tracing::callsite::rebuild_interest_cache();
    let before = statements.count();
    let in_flight: Vec<[i64; 1]> = lanes.iter().map(|lane| [first[lane]]).collect();
    let claims = lanes
        .iter()
        .zip(&in_flight)
        .map(|(lane, in_flight)| store.claim(&leases[lane], 100, in_flight));
    let (claimed, stale_claim) = tokio::join!(futures::future::join_all(claims), store.claim(&stale, 100, &[]));
    let after_claims = statements.count();
    // One transaction a statement, however many lanes share it (and one for the probe).
    let own_claims = counted().await.1 - finished_before - 1;
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
    let own_before = counted().await.0;
    tracing::callsite::rebuild_interest_cache();
    let before_marks = statements.count();
    let (marked, stale_mark) = tokio::join!(
        futures::future::join_all(marks),
        store.mark_published(&stale, &stale_done)
    );
    let after_marks = statements.count();
    // One transaction id a statement, however many lanes share it (and one for the probe).
    let own_marks = counted().await.0 - own_before - 1;
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

    // Two statements run at a time: the first lane's starts alone, the second's beside it, and
    // every request that came while they ran shares the third.
    let (claim_statements, mark_statements) = (after_claims - before, after_marks - before_marks);
    assert!(
        (1..=3).contains(&claim_statements) && (1..=3).contains(&mark_statements),
        "{} lanes at once: claims took {claim_statements} statements, marks {mark_statements}",
        lanes.len() + 1
    );
    assert!(
        (1..=3).contains(&own_claims),
        "the store counted {own_claims} transactions for {} claims that shared at most three statements",
        lanes.len() + 1
    );
    assert!(
        (1..=3).contains(&own_marks),
        "the store counted {own_marks} writes for {} marks that shared at most three statements",
        lanes.len() + 1
    );
}
