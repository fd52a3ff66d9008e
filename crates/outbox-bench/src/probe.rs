//! Instrumented wrappers around the relay's seams: a [`Store`] that times claims and marks and
//! counts published rows, and a [`Publisher`] that times publishes and records when each message's
//! delivery report came back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::{
    DeadLetter, Delivered, Lease, PublishError, Publisher, Status, Store, StoreAdmin, StoredMessage, Wakeups,
};
use tokio::sync::Notify;
use uuid::Uuid;

/// Time and count of the relay's phases, summed over lanes (lanes run concurrently, so the sums can
/// exceed wall time).
#[derive(Debug, Default)]
pub(crate) struct Phases {
    /// Rows marked published.
    pub(crate) marked: AtomicU64,
    /// Claim calls and their total time in microseconds.
    pub(crate) claims: AtomicU64,
    pub(crate) claim_us: AtomicU64,
    /// Rows returned by claims.
    pub(crate) claimed: AtomicU64,
    /// Mark calls and their total time in microseconds.
    pub(crate) marks: AtomicU64,
    pub(crate) mark_us: AtomicU64,
    /// Publish calls and their total time in microseconds.
    pub(crate) publishes: AtomicU64,
    pub(crate) publish_us: AtomicU64,
    /// Messages the publisher answered with an error.
    pub(crate) failed: AtomicU64,
    /// Fired when `marked` reaches `target`.
    pub(crate) done: Notify,
    pub(crate) target: AtomicU64,
}

impl Phases {
    /// Phases that fire `done` once `target` rows are marked.
    pub(crate) fn until(target: u64) -> Arc<Self> {
        let p = Phases::default();
        p.target.store(target, Ordering::Relaxed);
        Arc::new(p)
    }

    /// Waits until `target` rows are marked, at most `limit`. True when reached.
    pub(crate) async fn wait(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let n = self.done.notified();
            if self.marked.load(Ordering::Relaxed) >= self.target.load(Ordering::Relaxed) {
                return true;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return self.marked.load(Ordering::Relaxed) >= self.target.load(Ordering::Relaxed);
            }
        }
    }

    /// Microseconds per marked row spent in claim, publish and mark (summed over lanes).
    pub(crate) fn per_msg_us(&self) -> (f64, f64, f64) {
        let n = self.marked.load(Ordering::Relaxed).max(1) as f64;
        let us = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / n;
        (us(&self.claim_us), us(&self.publish_us), us(&self.mark_us))
    }

    /// Average rows per claim.
    pub(crate) fn avg_batch(&self) -> f64 {
        self.claimed.load(Ordering::Relaxed) as f64 / self.claims.load(Ordering::Relaxed).max(1) as f64
    }
}

fn add_us(a: &AtomicU64, since: Instant) {
    a.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// A [`Store`] that records [`Phases`].
pub(crate) struct TimedStore<S> {
    pub(crate) inner: S,
    pub(crate) phases: Arc<Phases>,
}

#[async_trait]
impl<S: Store> Store for TimedStore<S> {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> outbox::Result<Vec<Lease>> {
        self.inner.acquire(owner, max, ttl).await
    }
    async fn renew(&self, owner: &str, ttl: Duration) -> outbox::Result<Vec<Lease>> {
        self.inner.renew(owner, ttl).await
    }
    async fn release(&self, lease: &Lease) -> outbox::Result<()> {
        self.inner.release(lease).await
    }
    async fn live_owners(&self) -> outbox::Result<usize> {
        self.inner.live_owners().await
    }
    async fn probe(&self) -> outbox::Result<outbox::ProbeCounts> {
        self.inner.probe().await
    }
    async fn leave(&self, owner: &str) -> outbox::Result<()> {
        self.inner.leave(owner).await
    }
    async fn claim(&self, lease: &Lease, limit: usize, in_flight: &[i64]) -> outbox::Result<Vec<StoredMessage>> {
        let t = Instant::now();
        let r = self.inner.claim(lease, limit, in_flight).await;
        add_us(&self.phases.claim_us, t);
        self.phases.claims.fetch_add(1, Ordering::Relaxed);
        if let Ok(rows) = &r {
            self.phases.claimed.fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
        r
    }
    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> outbox::Result<()> {
        let t = Instant::now();
        let r = self.inner.mark_published(lease, done).await;
        add_us(&self.phases.mark_us, t);
        self.phases.marks.fetch_add(1, Ordering::Relaxed);
        if r.is_ok() {
            let n = self.phases.marked.fetch_add(done.len() as u64, Ordering::Relaxed) + done.len() as u64;
            if n >= self.phases.target.load(Ordering::Relaxed) {
                self.phases.done.notify_waiters();
            }
        }
        r
    }
    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> outbox::Result<()> {
        self.inner.mark_failed(lease, pos, error, retry_in).await
    }
    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> outbox::Result<()> {
        self.inner.dead_letter(lease, pos, error, park).await
    }
    // Forwarded, or the lanes never look idle and PostgreSQL writers never send NOTIFY.
    fn wakeups(&self) -> Option<&dyn Wakeups> {
        self.inner.wakeups()
    }
}

#[async_trait]
impl<S: Store> StoreAdmin for TimedStore<S> {
    async fn status(&self) -> outbox::Result<Status> {
        self.inner.status().await
    }
    async fn dead_letters(&self, limit: usize) -> outbox::Result<Vec<DeadLetter>> {
        self.inner.dead_letters(limit).await
    }
    async fn retry_dead_letter(&self, id: Uuid) -> outbox::Result<bool> {
        self.inner.retry_dead_letter(id).await
    }
    async fn discard_dead_letter(&self, id: Uuid) -> outbox::Result<bool> {
        self.inner.discard_dead_letter(id).await
    }
    async fn cleanup_published(&self, older_than: Duration, batch: usize) -> outbox::Result<u64> {
        self.inner.cleanup_published(older_than, batch).await
    }
}

/// Delivery report times by message id.
pub(crate) type Reports = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// A [`Publisher`] that records [`Phases`] and, optionally, per-message report times.
pub(crate) struct TimedPublisher<P> {
    pub(crate) inner: P,
    pub(crate) phases: Arc<Phases>,
    pub(crate) reports: Option<Reports>,
}

#[async_trait]
impl<P: Publisher> Publisher for TimedPublisher<P> {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let t = Instant::now();
        let out = self.inner.publish(batch).await;
        // The publisher answers when the batch's last report is in; at the rates measured for
        // latency, batches are a few messages.
        let now = Instant::now();
        let failed = out.iter().filter(|r| r.is_err()).count() as u64;
        self.phases.failed.fetch_add(failed, Ordering::Relaxed);
        add_us(&self.phases.publish_us, t);
        self.phases.publishes.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = &self.reports {
            let mut r = r.lock().expect("reports lock");
            for (row, res) in batch.iter().zip(&out) {
                if res.is_ok() {
                    r.entry(row.id).or_insert(now);
                }
            }
        }
        out
    }
}

/// A publisher without a broker that confirms every batch after `delay` (zero: the SQL-only
/// drain; a few milliseconds: a remote broker's acks=all round trip).
pub(crate) struct NullPublisher {
    pub(crate) delay: Duration,
}

#[async_trait]
impl Publisher for NullPublisher {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        batch.iter().map(|r| Ok(Delivered::new(r.pos).at(0, 0))).collect()
    }
}
