//! The lingering lanes' look: a look that finds nothing makes the next one wait longer, so a relay
//! looking every millisecond does not query that often for lanes that get no rows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use outbox::postgres::PgStore;
use outbox::{
    DeadLetter, Delivered, Lease, Message, ProbeCounts, Result, Status, Store, StoreAdmin, StoredMessage, Wakeups,
};
use outbox_tests::db::commit_each;
use outbox_tests::embedded::{drained, start, test_config};
use uuid::Uuid;

use super::Scripted;

/// PostgreSQL, counting the looks at the lingering lanes.
struct Counted {
    inner: PgStore,
    looks: AtomicUsize,
}

#[async_trait]
impl Wakeups for Counted {
    async fn listen(&self) -> Result<BoxStream<'static, i32>> {
        self.inner.listen().await
    }
    async fn set_idle(&self, lease: &Lease, idle: bool) -> Result<()> {
        self.inner.set_idle(lease, idle).await
    }
    async fn ready_lanes(&self, lanes: &[(i32, i64)]) -> Result<Vec<i32>> {
        self.looks.fetch_add(1, Ordering::SeqCst);
        self.inner.ready_lanes(lanes).await
    }
}

#[async_trait]
impl Store for Counted {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
        self.inner.acquire(owner, max, ttl).await
    }
    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
        self.inner.renew(owner, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn live_owners(&self) -> Result<usize> {
        self.inner.live_owners().await
    }
    async fn probe(&self) -> Result<ProbeCounts> {
        self.inner.probe().await
    }
    async fn leave(&self, owner: &str) -> Result<()> {
        self.inner.leave(owner).await
    }
    async fn claim(&self, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
        self.inner.claim(lease, limit, in_flight).await
    }
    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()> {
        self.inner.mark_published(lease, done).await
    }
    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
        self.inner.mark_failed(lease, pos, error, retry_in).await
    }
    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
        self.inner.dead_letter(lease, pos, error, park).await
    }
    fn wakeups(&self) -> Option<&dyn Wakeups> {
        Some(self)
    }
}

#[async_trait]
impl StoreAdmin for Counted {
    async fn status(&self) -> Result<Status> {
        self.inner.status().await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(limit).await
    }
    async fn retry_dead_letter(&self, id: Uuid) -> Result<bool> {
        self.inner.retry_dead_letter(id).await
    }
    async fn discard_dead_letter(&self, id: Uuid) -> Result<bool> {
        self.inner.discard_dead_letter(id).await
    }
    async fn cleanup_published(&self, older_than: Duration, batch: usize) -> Result<u64> {
        self.inner.cleanup_published(older_than, batch).await
    }
}

#[tokio::test]
async fn a_lingering_lane_that_gets_no_rows_is_looked_at_every_5_ms_at_the_most_even_at_1_ms() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Counted {
        inner: pg,
        looks: AtomicUsize::new(0),
    });
    let cfg = test_config()
        .linger(Duration::from_secs(30))
        .linger_poll_interval(Duration::from_millis(1));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    drained(&*store, Duration::from_secs(10)).await;
    // The lane that published the row lingers, and nothing more comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, since) = (store.looks.load(Ordering::SeqCst), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let looks = store.looks.load(Ordering::SeqCst) - before;
    let most = since.elapsed().as_secs_f64() * 1000.0 / 5.0;
    relay.stop().await;
    assert!(looks > 0, "the lingering lane was not looked at");
    assert!(
        (looks as f64) <= most * 1.1,
        "{looks} looks in a second at lanes that got nothing (at most {most:.0} expected)"
    );
}
