//! The lingering lanes' look: a look that finds nothing makes the next one wait longer, so a relay
//! looking every millisecond does not query that often for lanes that get no rows.

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
