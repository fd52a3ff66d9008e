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
    let idle = "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL AND idle";
    let all_idle = || async { outbox_tests::db::scalar::<_, i64>(&pool, idle).await == i64::from(outbox::LANES) };
    outbox_tests::wait::wait_for("every lane to ask for NOTIFY", Duration::from_secs(10), all_idle).await;
    // Each lane looks once more after it asked.
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let cfg = test_config()
        .linger(Duration::ZERO)
        .poll_interval(Duration::from_secs(30))
        .backoff_base(Duration::from_millis(50))
        .backoff_max(Duration::from_millis(100));
    let publisher = Scripted::new([("k", 1, 2)]);
    let relay = start(pg.clone(), Arc::clone(&publisher), cfg);
    commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    drained(&pg, Duration::from_secs(10)).await;
    relay.stop().await;
    assert_eq!(
        super::failures(&publisher.events()),
        2,
        "the scripted failures happened"
    );
}
