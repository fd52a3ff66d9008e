//! Tests that need the database server to themselves: `cargo test` runs one test binary at a
//! time, and the tests of this one take turns ([`ALONE`]). Each reads counts of the whole server,
//! which another test's writes beside it (on a database of its own, the same server) would change:
//! the adaptive pace counts the transaction ids handed out (writes beside it read as a busy
//! service), the marks' test counts WAL flushes.

use std::time::Duration;

use outbox::{Message, Store, StoreAdmin};
use outbox_tests::db::{commit_each, scalar, Service};
use outbox_tests::embedded::{start, test_config, Concurrency, PaceGauge};

/// Held by each test for its whole run: one at a time.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The adaptive pace on PostgreSQL, end to end: with nobody else on the database it lets more
/// lanes work; a service that starts writing brings it below one lane (it is told by the
/// transaction ids the service takes); once the service stops, the pace grows again.
#[tokio::test]
async fn the_adaptive_pace_gives_way_to_a_service_that_starts_writing_and_comes_back_after() {
    let _alone = ALONE.lock().await;
    let pool = outbox_tests::db::fresh_pg().await;
    let gauge = PaceGauge::default();
    // The tokio test runs every task on this thread: the relay registers its gauge here.
    let _recorder = metrics::set_default_local_recorder(&gauge);
    let store = outbox::postgres::PgStore::new(pool.clone());
    let relay = start(store, Concurrency::default(), test_config().adaptive_pace(true));
    let pace = || async {
        match gauge.lanes() {
            l if l >= 2.0 => Ok(()),
            l => Err(format!("pace {l}")),
        }
    };
    outbox_tests::wait::until(
        "the pace above one lane, nobody else busy",
        Duration::from_secs(20),
        pace,
    )
    .await;
    let service = Service::writing(&pool).await;
    outbox_tests::wait::until(
        "the pace below one lane, a service writing",
        Duration::from_secs(10),
        || async {
            match gauge.lanes() {
                l if l < 1.0 => Ok(()),
                l => Err(format!("pace {l}")),
            }
        },
    )
    .await;
    service.stop().await;
    outbox_tests::wait::until("the pace back above one lane", Duration::from_secs(30), pace).await;
    relay.stop().await;
}

/// The relay's marks commit without waiting for the WAL flush (a mark the database forgets in a
/// crash only sends its rows again), and leave the connection's own `synchronous_commit` as it was:
/// a pool shared with the service keeps its durability. Counted by `pg_stat_wal` (server-wide, so
/// the plain deletes beside the marks are the measure); each connection reports its counts before
/// it answers `pg_stat_force_next_flush()`.
#[tokio::test]
async fn marks_do_not_wait_for_the_wal_flush_and_leave_the_connections_setting_alone() {
    let _alone = ALONE.lock().await;
    const N: usize = 60;
    let pool = outbox_tests::db::fresh_pg().await;
    let one = || {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
    };
    let syncs = || async {
        let n: i64 = scalar(&pool, "SELECT wal_sync FROM pg_stat_wal").await;
        n
    };
    // The connection's own setting, after which it reports its counts.
    let setting = |p: sqlx::PgPool| async move {
        let s: String = scalar(&p, "SHOW synchronous_commit").await;
        outbox_tests::db::exec(&p, "SELECT pg_stat_force_next_flush()").await;
        s
    };
    outbox_tests::db::exec(&pool, "CREATE TABLE scratch (id INT PRIMARY KEY)").await;
    outbox_tests::db::exec(&pool, "INSERT INTO scratch SELECT generate_series(1, 60)").await;
    commit_each(&pool, (0..N).map(|_| Message::new("t", "x").key("k"))).await;

    let plain = one().await.unwrap();
    let before = syncs().await;
    for id in 1..=N as i32 {
        sqlx::query("DELETE FROM scratch WHERE id = $1")
            .bind(id)
            .execute(&plain)
            .await
            .unwrap();
    }
    assert_eq!(setting(plain).await, "on");
    let between = syncs().await;

    let relay = one().await.unwrap();
    let store = outbox::postgres::PgStore::new(relay.clone());
    let lease = store
        .acquire("marker", 64, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.lane == outbox::lane_of(Some("k"), uuid::Uuid::nil(), outbox::LANES))
        .expect("the key's lane");
    let rows = store.claim(&lease, N, &[]).await.unwrap();
    assert_eq!(rows.len(), N);
    for row in &rows {
        store
            .mark_published(&lease, &[outbox::Delivered::new(row.pos)])
            .await
            .unwrap();
    }
    assert_eq!(
        setting(relay).await,
        "on",
        "the marks' setting ends with their statement"
    );
    let after = syncs().await;
    let (plain_syncs, mark_syncs) = (between - before, after - between);
    eprintln!("WAL flushes: {N} marks {mark_syncs}, {N} plain deletes {plain_syncs}");
    assert!(
        mark_syncs * 2 < plain_syncs,
        "{N} marks flushed the WAL {mark_syncs} times, {N} plain deletes {plain_syncs} times"
    );
    let status = outbox::postgres::PgStore::new(pool.clone()).status().await.unwrap();
    assert_eq!(status.pending, 0, "every row marked");
}
