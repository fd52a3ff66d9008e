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
    let lane = lane_of_key("k0");
    (lane, keys_of_lane(lane))
}

/// The lane of a key (of messages whose id plays no part in it).
fn lane_of_key(key: &str) -> i32 {
    outbox::lane_of(Some(key), uuid::Uuid::nil(), outbox::LANES)
}

/// Keys `k0`, `k1`, ... of `lane`.
pub(crate) fn keys_of_lane(lane: i32) -> impl Iterator<Item = String> {
    (0..).map(|i| format!("k{i}")).filter(move |k| lane_of_key(k) == lane)
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
    // One lane (lane 0, the first free one): no idle lane beside it looks for rows after the
    // writers it saw open have ended (`writers.rs` of outbox-relay), which this count would take in.
    let cfg = test_config()
        .linger(Duration::from_secs(30))
        .linger_above_writes(0.0)
        .linger_poll_interval(Duration::from_millis(1))
        .max_lanes(Some(1));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    let key = keys_of_lane(0).next().unwrap();
    commit_each(&pool, [Message::new("t", "x").key(key)]).await;
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

/// Counts the claims, those that found nothing, and the looks for a ready row (lanes that do not
/// linger look only after writers they saw open when they said idle have ended).
#[derive(Default)]
struct Claims {
    all: AtomicUsize,
    empty: AtomicUsize,
    looks: AtomicUsize,
}

impl Observer for Claims {
    fn after(&self, call: StoreCall, rows: usize, _: Duration, _: bool) {
        if call == StoreCall::ReadyLanes {
            self.looks.fetch_add(1, Ordering::SeqCst);
        }
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
    let (pool, store, relay) = relay_asking_for_notify(Claims::default()).await;
    let counts = || {
        let c = store.observer();
        let load = |n: &AtomicUsize| n.load(Ordering::SeqCst);
        (load(&c.all), load(&c.empty), load(&c.looks))
    };
    let before = counts();
    for i in 0..5 {
        commit_each(&pool, [Message::new("t", format!("{i}")).key("k")]).await;
        drained(&*store, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = counts();
    relay.stop().await;
    let (claims, empty, looks) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    // A look after writers ended (other tests' transactions) may find a row before its NOTIFY
    // does; the wake-up then claims for nothing: at most one such claim per look.
    assert_eq!(
        (claims - empty, empty.saturating_sub(looks)),
        (5, 0),
        "five commits, one at a time: {claims} claims, {empty} of them empty, {looks} looks"
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

/// Two rows of one batch backed off with delays of their own (jittered): the lane looks when
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

/// Holds the `n`th call to the idle flag after `countdown` is set to `n` until released; counts
/// the claims.
#[derive(Default)]
struct HoldIdle {
    countdown: AtomicUsize,
    holding: tokio::sync::Notify,
    release: tokio::sync::Notify,
    claims: AtomicUsize,
}

#[async_trait::async_trait]
impl Observer for HoldIdle {
    async fn before(&self, call: StoreCall) {
        let count_down = |n: usize| n.checked_sub(1);
        if call == StoreCall::SetIdle
            && self
                .countdown
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, count_down)
                == Ok(1)
        {
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

/// A relay whose lanes never linger (only a full batch makes a flag say busy), publishing after
/// `publish_takes`; the lane of `a` and `b` said busy (a full batch of two) and is held as it asks
/// for NOTIFY, while a writer that inserted `a` (flag busy: no NOTIFY) stays open.
struct HeldLane {
    pool: sqlx::PgPool,
    store: Arc<Observed<outbox::postgres::PgStore, HoldIdle>>,
    relay: outbox_tests::embedded::Running,
    publisher: Arc<Scripted>,
    open: sqlx::Transaction<'static, sqlx::Postgres>,
    b: String,
}

async fn held_lane_with_an_open_writer(pipeline: usize, publish_takes: Duration) -> HeldLane {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, HoldIdle::default()));
    let (lane, mut keys) = keys_of_one_lane();
    let (x, a, b) = (keys.next().unwrap(), keys.next().unwrap(), keys.next().unwrap());
    // Without the adaptive pace: on a database busy with other tests it may let a lane that caught
    // up work 5 % of the time, and a batch of 500 ms would then rest 9.5 s before the lane asks for
    // NOTIFY (the wait below is 10 s).
    let cfg = test_config()
        .adaptive_pace(false)
        .linger(Duration::ZERO)
        .batch_size(2)
        .pipeline(pipeline)
        .poll_interval(Duration::from_secs(30));
    let publisher = Scripted::slow([], publish_takes);
    let relay = start(Arc::clone(&store), Arc::clone(&publisher), cfg);
    every_lane_asks_for_notify(&pool).await;
    // Three rows in one transaction, batches of two: the full batch makes the lane say busy (the
    // first call to the flag), and when it runs dry it asks for NOTIFY again (the second): held.
    let holding = store.observer().holding.notified();
    store.observer().countdown.store(2, Ordering::SeqCst);
    let rows = (1..=3).map(|i| Message::new("t", format!("x{i}")).key(x.as_str()));
    commit_each(&pool, rows).await;
    if tokio::time::timeout(Duration::from_secs(10), holding).await.is_err() {
        // What the lane's row and lease say, for a failure that comes only on a loaded machine.
        let state = format!(
            "SELECT format('idle %s, lease live %s, rows %s, flag calls left %s, claims %s', idle, \
             expires_at > now(), (SELECT count(*) FROM outbox_messages), {}, {}) \
             FROM outbox_leases WHERE lane = {lane}",
            store.observer().countdown.load(Ordering::SeqCst),
            store.observer().claims.load(Ordering::SeqCst),
        );
        let state: String = outbox_tests::db::scalar(&pool, &state).await;
        panic!("the lane did not ask for NOTIFY within 10 s: {state}");
    }
    let busy = format!("SELECT count(*) FROM outbox_leases WHERE lane = {lane} AND NOT idle");
    assert_eq!(
        outbox_tests::db::scalar::<_, i64>(&pool, &busy).await,
        1,
        "the lane said busy until the held call"
    );
    let mut open = pool.begin().await.unwrap();
    outbox::enqueue(&mut open, &Message::new("t", "a").key(a.as_str()))
        .await
        .unwrap();
    HeldLane {
        pool,
        store,
        relay,
        publisher,
        open,
        b,
    }
}

/// A writer that inserted its row while the lane's flag said busy, and is still open when the
/// lane, its flag saying idle, looks once more and finds nothing, sends no NOTIFY when it commits:
/// the lane looks again once the transactions open when its flag said idle have ended, not at its
/// next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_after_the_lanes_last_look_since_it_asked_for_notify_is_not_left_to_the_poll() {
    let held = held_lane_with_an_open_writer(1, Duration::from_millis(50)).await;
    // The writer of a stays open past the lane's look once more.
    let claims = held.store.observer().claims.load(Ordering::SeqCst);
    held.store.observer().release.notify_one();
    outbox_tests::wait::wait_for("the lane to look once more", Duration::from_secs(10), || async {
        held.store.observer().claims.load(Ordering::SeqCst) > claims
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = Instant::now();
    held.open.commit().await.unwrap();
    drained(&*held.store, Duration::from_secs(10)).await;
    held.relay.stop().await;
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
    let held = held_lane_with_an_open_writer(pipeline, Duration::from_millis(500)).await;
    // Meanwhile another writer commits b.
    commit_each(&held.pool, [Message::new("t", "b").key(held.b.as_str())]).await;
    held.store.observer().release.notify_one();
    // The lane's look once more finds b; a commits while b's batch is in flight.
    let started = |key: &str| {
        let key = key.to_owned();
        move |e: &super::Event| matches!(e, super::Event::Start(_, rows) if rows.iter().any(|(k, _, _)| *k == key))
    };
    outbox_tests::wait::wait_for("b to be published", Duration::from_secs(10), || async {
        held.publisher.events().iter().any(started(&held.b))
    })
    .await;
    held.open.commit().await.unwrap();
    drained(&*held.store, Duration::from_secs(10)).await;
    held.relay.stop().await;
}

/// A transaction that stays open past the lanes' flags saying idle keeps them asking whether it
/// has ended; they still look at their poll: a row committed without NOTIFY meanwhile is found then.
#[tokio::test]
async fn a_lane_that_asks_after_a_transaction_that_stays_open_still_looks_at_its_poll() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let mut long = pool.begin().await.unwrap();
    outbox_tests::db::exec(&mut *long, "SELECT txid_current()").await;
    let cfg = test_config()
        .linger(Duration::ZERO)
        .poll_interval(Duration::from_secs(1));
    let relay = start(pg.clone(), Scripted::new([]), cfg);
    every_lane_asks_for_notify(&pool).await;
    let mut tx = pool.begin().await.unwrap();
    outbox::Outbox::new()
        .notify(false)
        .enqueue(&mut tx, &Message::new("t", "x").key("k"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    drained(&pg, Duration::from_secs(10)).await;
    relay.stop().await;
    long.rollback().await.unwrap();
}

/// Holds the relay's LISTEN until released.
#[derive(Default)]
struct HoldListen {
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Observer for HoldListen {
    async fn before(&self, call: StoreCall) {
        if call == StoreCall::Listen {
            self.release.notified().await;
        }
    }
}

/// The relay's LISTEN starts beside its lanes, on a connection of its own: a lane can say idle
/// before LISTEN is in place, and a row committed then sends a NOTIFY nobody hears. Once LISTEN is
/// in place every lane looks once more, so such a row is not left to the poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_before_the_relay_listens_is_not_left_to_the_poll() {
    let (pool, store, relay) = relay_asking_for_notify(HoldListen::default()).await;
    commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    let listening = Instant::now();
    store.observer().release.notify_one();
    drained(&*store, Duration::from_secs(10)).await;
    relay.stop().await;
    assert!(
        listening.elapsed() < Duration::from_secs(5),
        "published {:?} after LISTEN was let through",
        listening.elapsed()
    );
}

/// A relay on a fresh PostgreSQL store that `observer` watches, its lanes never lingering (poll
/// 30 s), publishing at once; once every lane has asked for NOTIFY.
async fn relay_asking_for_notify<O: Observer + 'static>(
    observer: O,
) -> (
    sqlx::PgPool,
    Arc<Observed<outbox::postgres::PgStore, O>>,
    outbox_tests::embedded::Running,
) {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, observer));
    let cfg = test_config()
        .linger(Duration::ZERO)
        .poll_interval(Duration::from_secs(30));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    every_lane_asks_for_notify(&pool).await;
    (pool, store, relay)
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

/// Once armed (after a claim that returned rows), holds the next claim until released.
struct HoldClaimAhead {
    armed: std::sync::atomic::AtomicBool,
    holding: std::sync::atomic::AtomicBool,
    release: tokio::sync::Semaphore,
}

impl Default for HoldClaimAhead {
    fn default() -> Self {
        HoldClaimAhead {
            armed: Default::default(),
            holding: Default::default(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Observer for HoldClaimAhead {
    async fn before(&self, call: StoreCall) {
        if call == StoreCall::Claim && self.armed.swap(false, Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            self.release.acquire().await.expect("never closed").forget();
        }
    }

    fn after(&self, call: StoreCall, rows: usize, _: Duration, _: bool) {
        if call == StoreCall::Claim && rows > 0 && !self.holding.load(Ordering::SeqCst) {
            self.armed.store(true, Ordering::SeqCst);
        }
    }
}

/// A lane that claims ahead sent the rows it held with the wake-up their commits left, and claimed
/// ahead again: rows committed meanwhile, whose NOTIFY had merged into that one wake-up, were then
/// held with no wake-up left, and waited for the poll. Rows held ahead now start the next batch
/// as soon as the batch in flight is settled.
#[tokio::test]
async fn rows_claimed_ahead_go_out_when_the_batch_in_flight_is_settled_not_at_the_poll() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(pg, HoldClaimAhead::default()));
    let cfg = test_config()
        .claim_ahead(outbox_relay::ClaimAhead::Always)
        .pipeline(1)
        .max_lanes(Some(1))
        .linger(Duration::ZERO)
        .poll_interval(Duration::from_secs(60));
    let relay = start(Arc::clone(&store), Scripted::slow([], Duration::from_millis(500)), cfg);
    // The relay holds lane 0 alone: three keys of it.
    let mut keys = keys_of_lane(0);
    let [a, b, c] = [(); 3].map(|_| keys.next().unwrap());
    // Let the idle lane ask for NOTIFY and find nothing (the look it takes after the flag).
    let idle = "SELECT count(*) FROM outbox_leases WHERE lane = 0 AND owner IS NOT NULL AND idle";
    outbox_tests::wait::wait_for("lane 0 asking for NOTIFY", Duration::from_secs(10), || async {
        outbox_tests::db::scalar::<_, i64>(&pool, idle).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    commit_each(&pool, [Message::new("t", "1").key(a)]).await;
    let observer = store.observer();
    outbox_tests::wait::until("the claim ahead held", Duration::from_secs(10), || async {
        observer
            .holding
            .load(Ordering::SeqCst)
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    // Committed while the first batch is published: the claim ahead takes the second, and the
    // third's NOTIFY merges into the second's.
    commit_each(&pool, [Message::new("t", "2").key(b)]).await;
    observer.release.add_permits(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    commit_each(&pool, [Message::new("t", "3").key(c)]).await;
    drained(&*store, Duration::from_secs(10)).await;
    relay.stop().await;
}
