//! When a lane looks for rows. The lingering lanes' look: a look that finds nothing makes the next
//! one wait longer, so a relay looking every millisecond does not query that often for lanes that
//! get no rows. A lane woken by NOTIFY claims once per wake-up, not again after every batch, and
//! looks again for a row it backed off when that row's delay ends, not at its next poll.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::observed::{Observed, Observer, StoreCall};
use outbox::Message;
use outbox_tests::db::commit_each;
use outbox_tests::embedded::{drained, start, test_config};

use super::Scripted;

/// The lane of key `k0`, and the keys `k0`, `k1`, ... that hash to it, in that order.
fn keys_of_one_lane() -> (i32, impl Iterator<Item = String>) {
    let lane_of = |key: &str| outbox::lane_of(Some(key), uuid::Uuid::nil(), outbox::LANES);
    let lane = lane_of("k0");
    (lane, (0..).map(|i| format!("k{i}")).filter(move |k| lane_of(k) == lane))
}

/// Counts the looks at the lingering lanes.
#[derive(Default)]
struct Looks(AtomicUsize);

impl Observer for Looks {
    fn after(&self, call: StoreCall, _: usize, _: Duration, _: bool) {
        if call == StoreCall::ReadyLanes {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn a_lingering_lane_that_gets_no_rows_is_looked_at_every_5_ms_at_the_most_even_at_1_ms() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, Looks::default()));
    let cfg = test_config()
        .linger(Duration::from_secs(30))
        .linger_above_writes(0.0)
        .linger_poll_interval(Duration::from_millis(1));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    drained(&*store, Duration::from_secs(10)).await;
    // The lane that published the row lingers, and nothing more comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, since) = (store.observer().0.load(Ordering::SeqCst), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let looks = store.observer().0.load(Ordering::SeqCst) - before;
    let most = since.elapsed().as_secs_f64() * 1000.0 / 5.0;
    relay.stop().await;
    assert!(looks > 0, "the lingering lane was not looked at");
    assert!(
        (looks as f64) <= most * 1.1,
        "{looks} looks in a second at lanes that got nothing (at most {most:.0} expected)"
    );
}

/// Counts the claims, and those that found nothing.
#[derive(Default)]
struct Claims {
    all: AtomicUsize,
    empty: AtomicUsize,
}

impl Observer for Claims {
    fn after(&self, call: StoreCall, rows: usize, _: Duration, _: bool) {
        if call == StoreCall::Claim {
            self.all.fetch_add(1, Ordering::SeqCst);
            if rows == 0 {
                self.empty.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// A lane that asks for NOTIFY (it does not linger) claims once per commit: after a batch that left
/// no row behind it does not claim again, since a row committed meanwhile sent a NOTIFY, which wakes
/// it.
#[tokio::test]
async fn a_lane_woken_by_notify_claims_once_per_commit_not_again_after_each_batch() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, Claims::default()));
    let cfg = test_config()
        .linger(Duration::ZERO)
        .poll_interval(Duration::from_secs(30));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    every_lane_asks_for_notify(&pool).await;
    let counts = || {
        let c = store.observer();
        (c.all.load(Ordering::SeqCst), c.empty.load(Ordering::SeqCst))
    };
    let before = counts();
    for i in 0..5 {
        commit_each(&pool, [Message::new("t", format!("{i}")).key("k")]).await;
        drained(&*store, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = counts();
    relay.stop().await;
    let (claims, empty) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(
        (claims, empty),
        (5, 0),
        "five commits, one at a time: {claims} claims, {empty} of them empty"
    );
}

/// A row whose publish failed is published again when its backoff ends, not at the lane's next
/// poll: the lane that retries it sets its own wake-up for then.
#[tokio::test]
async fn a_lane_woken_by_notify_retries_a_failed_row_when_its_backoff_ends_not_at_the_next_poll() {
    retries_when_the_backoff_ends(test_config().linger(Duration::ZERO)).await;
}

/// The same for a lingering lane: its watch finds the row when the row's delay ends, not when the
/// lane's linger does.
#[tokio::test]
async fn a_lingering_lane_retries_a_failed_row_when_its_backoff_ends_not_when_its_linger_does() {
    let cfg = test_config().linger(Duration::from_secs(20)).linger_above_writes(0.0);
    retries_when_the_backoff_ends(cfg).await;
}

/// Two rows of one batch backed off with delays of their own (full jitter): the lane looks when
/// each delay ends, not only at the first.
#[tokio::test]
async fn a_lane_retries_each_row_it_backed_off_when_that_rows_delay_ends() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let mut keys = keys_of_one_lane().1.map(|k| &*Box::leak(k.into_boxed_str()));
    let (a, b) = (keys.next().unwrap(), keys.next().unwrap());
    let cfg = test_config()
        .linger(Duration::ZERO)
        .poll_interval(Duration::from_secs(30))
        .backoff_base(Duration::from_millis(200))
        .backoff_max(Duration::from_millis(400));
    let publisher = Scripted::new([(a, 1, 1), (b, 1, 1)]);
    let relay = start(pg.clone(), Arc::clone(&publisher), cfg);
    every_lane_asks_for_notify(&pool).await;
    commit_each(&pool, [Message::new("t", "a").key(a), Message::new("t", "b").key(b)]).await;
    drained(&pg, Duration::from_secs(10)).await;
    relay.stop().await;
    assert_eq!(
        super::failures(&publisher.events()),
        2,
        "the scripted failures happened"
    );
}

async fn retries_when_the_backoff_ends(cfg: outbox_relay::RelayConfig) {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let cfg = cfg
        .poll_interval(Duration::from_secs(30))
        .backoff_base(Duration::from_millis(50))
        .backoff_max(Duration::from_millis(100));
    let publisher = Scripted::new([("k", 1, 2)]);
    let relay = start(pg.clone(), Arc::clone(&publisher), cfg);
    every_lane_asks_for_notify(&pool).await;
    commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    drained(&pg, Duration::from_secs(10)).await;
    relay.stop().await;
    assert_eq!(
        super::failures(&publisher.events()),
        2,
        "the scripted failures happened"
    );
}

/// Holds the first call to the idle flag after it is armed until released; counts the claims.
#[derive(Default)]
struct HoldIdle {
    armed: std::sync::atomic::AtomicBool,
    holding: tokio::sync::Notify,
    release: tokio::sync::Notify,
    claims: AtomicUsize,
}

#[async_trait::async_trait]
impl Observer for HoldIdle {
    async fn before(&self, call: StoreCall) {
        if call == StoreCall::SetIdle && self.armed.swap(false, Ordering::SeqCst) {
            let released = self.release.notified();
            self.holding.notify_one();
            released.await;
        }
    }

    fn after(&self, call: StoreCall, _: usize, _: Duration, _: bool) {
        if call == StoreCall::Claim {
            self.claims.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Makes the lane of `x` say busy (a full batch of two), then holds it as it asks for NOTIFY.
async fn hold_the_lane_as_it_asks_for_notify(
    pool: &sqlx::PgPool,
    store: &Observed<outbox::postgres::PgStore, HoldIdle>,
    lane: i32,
    x: &str,
) {
    let rows = (1..=3).map(|i| Message::new("t", format!("x{i}")).key(x));
    commit_each(pool, rows).await;
    let busy = format!("SELECT count(*) FROM outbox_leases WHERE lane = {lane} AND NOT idle");
    outbox_tests::wait::wait_for("the lane to say busy", Duration::from_secs(10), || async {
        outbox_tests::db::scalar::<_, i64>(pool, &busy).await == 1
    })
    .await;
    let holding = store.observer().holding.notified();
    store.observer().armed.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), holding)
        .await
        .expect("the lane asked for NOTIFY");
}

/// A writer that inserted its row while the lane's flag said busy, and is still open when the
/// lane, its flag saying idle, looks once more and finds nothing, sends no NOTIFY when it commits:
/// the lane looks again once the transactions open when its flag said idle have ended, not at its
/// next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_after_the_lanes_last_look_since_it_asked_for_notify_is_not_left_to_the_poll() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, HoldIdle::default()));
    let (lane, mut keys) = keys_of_one_lane();
    let (x, a) = (keys.next().unwrap(), keys.next().unwrap());
    let cfg = test_config()
        .linger(Duration::ZERO)
        .batch_size(2)
        .poll_interval(Duration::from_secs(30));
    let relay = start(Arc::clone(&store), Scripted::slow([], Duration::from_millis(50)), cfg);
    every_lane_asks_for_notify(&pool).await;
    hold_the_lane_as_it_asks_for_notify(&pool, &store, lane, &x).await;
    // A writer inserts a (flag busy: no NOTIFY) and stays open past the lane's look once more.
    let mut open = pool.begin().await.unwrap();
    outbox::enqueue(&mut open, &Message::new("t", "a").key(a.as_str()))
        .await
        .unwrap();
    let claims = store.observer().claims.load(Ordering::SeqCst);
    store.observer().release.notify_one();
    outbox_tests::wait::wait_for("the lane to look once more", Duration::from_secs(10), || async {
        store.observer().claims.load(Ordering::SeqCst) > claims
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = Instant::now();
    open.commit().await.unwrap();
    drained(&*store, Duration::from_secs(10)).await;
    relay.stop().await;
    assert!(
        committed.elapsed() < Duration::from_secs(5),
        "a published {:?} after its commit",
        committed.elapsed()
    );
}

/// A writer that inserted its row while the lane's flag said busy sends no NOTIFY, even when it
/// commits after the flag said idle. The lane, having asked for NOTIFY, claims after every batch
/// until a claim finds nothing, so such a row is found then, not at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_inserted_before_its_lane_asked_for_notify_and_committed_after_is_not_left_to_the_poll() {
    inserted_before_the_lane_asked_for_notify_committed_after(1).await;
}

/// The same with batches pipelined: the row commits while the lane's batch claimed since it asked
/// for NOTIFY is published, and a claim beside that batch would find nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_batches_pipelined_a_row_inserted_before_its_lane_asked_for_notify_is_not_left_to_the_poll() {
    inserted_before_the_lane_asked_for_notify_committed_after(4).await;
}

async fn inserted_before_the_lane_asked_for_notify_committed_after(pipeline: usize) {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, HoldIdle::default()));
    let (lane, mut keys) = keys_of_one_lane();
    let (x, a, b) = (keys.next().unwrap(), keys.next().unwrap(), keys.next().unwrap());
    // Lanes that never linger: only a full batch makes the flag say busy.
    let cfg = test_config()
        .linger(Duration::ZERO)
        .batch_size(2)
        .pipeline(pipeline)
        .poll_interval(Duration::from_secs(30));
    let publisher = Scripted::slow([], Duration::from_millis(500));
    let relay = start(Arc::clone(&store), Arc::clone(&publisher), cfg);
    every_lane_asks_for_notify(&pool).await;
    hold_the_lane_as_it_asks_for_notify(&pool, &store, lane, &x).await;
    // Meanwhile a writer inserts a (flag busy: no NOTIFY) and stays open; another commits b.
    let mut open = pool.begin().await.unwrap();
    outbox::enqueue(&mut open, &Message::new("t", "a").key(a.as_str()))
        .await
        .unwrap();
    commit_each(&pool, [Message::new("t", "b").key(b.as_str())]).await;
    store.observer().release.notify_one();
    // The lane's look once more finds b; a commits while b's batch is in flight.
    let started = |key: &str| {
        let key = key.to_owned();
        move |e: &super::Event| matches!(e, super::Event::Start(_, rows) if rows.iter().any(|(k, _, _)| *k == key))
    };
    outbox_tests::wait::wait_for("b to be published", Duration::from_secs(10), || async {
        publisher.events().iter().any(started(&b))
    })
    .await;
    open.commit().await.unwrap();
    drained(&*store, Duration::from_secs(10)).await;
    relay.stop().await;
}

/// Waits until every lane of the relay on `pool` has asked for NOTIFY and looked once more: a row
/// committed from then on wakes its lane (a writer that inserted earlier, while the flag said busy,
/// sends no NOTIFY).
async fn every_lane_asks_for_notify(pool: &sqlx::PgPool) {
    let idle = "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL AND idle";
    let all_idle = || async { outbox_tests::db::scalar::<_, i64>(pool, idle).await == i64::from(outbox::LANES) };
    outbox_tests::wait::wait_for("every lane to ask for NOTIFY", Duration::from_secs(10), all_idle).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A lane that no commit wakes (SQLite has no NOTIFY; the lane does not linger) claims as often with
/// batches pipelined as with one batch at a time: once more after a short batch is settled, not
/// also beside it, where it would mostly find nothing.
#[tokio::test]
async fn a_lane_no_commit_wakes_claims_as_often_with_batches_pipelined_as_with_one() {
    let mut claims = Vec::new();
    for pipeline in [1, 4] {
        let pool = outbox_tests::db::fresh_sqlite().await;
        // Three rows of one lane, batches of two: a full batch first (which times the publish that
        // a pipelined batch needs to be slower than the claim), then a short one.
        commit_each(
            &pool,
            keys_of_one_lane().1.take(3).map(|k| Message::new("t", "x").key(k)),
        )
        .await;
        let store = Arc::new(Observed::new(outbox::sqlite::SqliteStore::new(pool), Claims::default()));
        let cfg = test_config()
            .linger(Duration::ZERO)
            .batch_size(2)
            .pipeline(pipeline)
            .poll_interval(Duration::from_secs(30));
        let relay = start(Arc::clone(&store), Scripted::slow([], Duration::from_millis(300)), cfg);
        drained(&*store, Duration::from_secs(10)).await;
        // The look after the batch is settled, then nothing until the poll.
        tokio::time::sleep(Duration::from_millis(300)).await;
        claims.push(store.observer().all.load(Ordering::SeqCst));
        relay.stop().await;
    }
    assert_eq!(
        claims[0], claims[1],
        "claims with one batch in flight, then with four: {claims:?}"
    );
}
