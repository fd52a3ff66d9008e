//! Instrumented wrappers around the relay's seams: a store that times claims and marks and
//! counts published rows, and a [`Publisher`] that times publishes and records when each message's
//! delivery report came back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::observed::{Observed, Observer, StoreCall};
use outbox::{Delivered, PublishError, Publisher, StoredMessage};
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
    /// Claims that returned no row.
    pub(crate) empty_claims: AtomicU64,
    /// Questions after a lane's flag said idle: which transactions are open, which still are.
    pub(crate) open_questions: AtomicU64,
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

/// A [`Store`](outbox::Store) that records [`Phases`]: the claims' and marks' calls, rows and
/// times.
pub(crate) type TimedStore<S> = Observed<S, Arc<Phases>>;

impl Observer for Phases {
    fn after(&self, call: StoreCall, rows: usize, took: Duration, ok: bool) {
        let us = took.as_micros() as u64;
        match call {
            StoreCall::Claim => {
                self.claim_us.fetch_add(us, Ordering::Relaxed);
                self.claims.fetch_add(1, Ordering::Relaxed);
                self.claimed.fetch_add(rows as u64, Ordering::Relaxed);
                if rows == 0 {
                    self.empty_claims.fetch_add(1, Ordering::Relaxed);
                }
            }
            StoreCall::MarkPublished => {
                self.mark_us.fetch_add(us, Ordering::Relaxed);
                self.marks.fetch_add(1, Ordering::Relaxed);
                if ok {
                    let n = self.marked.fetch_add(rows as u64, Ordering::Relaxed) + rows as u64;
                    if n >= self.target.load(Ordering::Relaxed) {
                        self.done.notify_waiters();
                    }
                }
            }
            StoreCall::OpenTransactions | StoreCall::StillOpen => {
                self.open_questions.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// By message id: when the publish call that carried it started, and when its delivery report came
/// back.
pub(crate) type Reports = Arc<Mutex<HashMap<Uuid, (Instant, Instant)>>>;

/// A [`Publisher`] that records [`Phases`] and, optionally, per message when its publish call
/// started and when its report came back ([`Reports`]).
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
                    r.entry(row.id).or_insert((t, now));
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
