//! A [`Store`] whose calls an [`Observer`] sees: to time or count the relay's statements (metrics,
//! benchmarks), or to hold one back (tests). Every call goes to the inner store unchanged.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use uuid::Uuid;

use crate::{DeadLetter, Delivered, Lease, ProbeCounts, Result, Status, Store, StoreAdmin, StoredMessage, Wakeups};

/// A call of [`Store`] or [`Wakeups`], as an [`Observer`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreCall {
    /// [`Store::acquire`].
    Acquire,
    /// [`Store::renew`].
    Renew,
    /// [`Store::release`].
    Release,
    /// [`Store::live_owners`].
    LiveOwners,
    /// [`Store::probe`].
    Probe,
    /// [`Store::leave`].
    Leave,
    /// [`Store::claim`].
    Claim,
    /// [`Store::mark_published`].
    MarkPublished,
    /// [`Store::mark_failed`].
    MarkFailed,
    /// [`Store::dead_letter`].
    DeadLetter,
    /// [`Wakeups::listen`].
    Listen,
    /// [`Wakeups::set_idle`].
    SetIdle,
    /// [`Wakeups::ready_lanes`]: the look at the lingering lanes.
    ReadyLanes,
    /// [`Wakeups::open_transactions`].
    OpenTransactions,
    /// [`Wakeups::still_open`].
    StillOpen,
}

/// Sees every call of an [`Observed`] store. [`StoreAdmin`] calls are not observed.
#[async_trait]
pub trait Observer: Send + Sync + 'static {
    /// Before each call; the call waits for it.
    async fn before(&self, call: StoreCall) {
        let _ = call;
    }

    /// After each call: the rows it carried (claimed, given to a mark; one for a call on one row,
    /// none otherwise), how long it took and whether it succeeded.
    fn after(&self, call: StoreCall, rows: usize, took: Duration, ok: bool) {
        let _ = (call, rows, took, ok);
    }
}

#[async_trait]
impl<O: Observer + ?Sized> Observer for Arc<O> {
    async fn before(&self, call: StoreCall) {
        (**self).before(call).await;
    }

    fn after(&self, call: StoreCall, rows: usize, took: Duration, ok: bool) {
        (**self).after(call, rows, took, ok);
    }
}

/// `inner`, its calls seen by `observer`. Its wake-up is the inner store's, observed: none when
/// the inner store has none.
#[derive(Debug)]
pub struct Observed<S, O> {
    inner: S,
    observer: O,
}

impl<S, O> Observed<S, O> {
    /// `inner`, observed by `observer`.
    pub fn new(inner: S, observer: O) -> Self {
        Observed { inner, observer }
    }

    /// The store observed.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The observer.
    pub fn observer(&self) -> &O {
        &self.observer
    }
}

impl<S: Send + Sync, O: Observer> Observed<S, O> {
    async fn run<T, F>(&self, call: StoreCall, rows: impl FnOnce(&T) -> usize + Send, f: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send,
        T: Send,
    {
        self.observer.before(call).await;
        let start = Instant::now();
        let out = f.await;
        let n = out.as_ref().map_or(0, rows);
        self.observer.after(call, n, start.elapsed(), out.is_ok());
        out
    }
}

fn none<T>(_: &T) -> usize {
    0
}

fn one<T>(_: &T) -> usize {
    1
}

#[async_trait]
impl<S: Store, O: Observer> Store for Observed<S, O> {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
        self.run(StoreCall::Acquire, none, self.inner.acquire(owner, max, ttl))
            .await
    }
    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
        self.run(StoreCall::Renew, none, self.inner.renew(owner, ttl)).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.run(StoreCall::Release, none, self.inner.release(lease)).await
    }
    async fn live_owners(&self) -> Result<usize> {
        self.run(StoreCall::LiveOwners, none, self.inner.live_owners()).await
    }
    async fn probe(&self) -> Result<ProbeCounts> {
        self.run(StoreCall::Probe, none, self.inner.probe()).await
    }
    async fn leave(&self, owner: &str) -> Result<()> {
        self.run(StoreCall::Leave, none, self.inner.leave(owner)).await
    }
    async fn claim(&self, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
        let claimed = |rows: &Vec<StoredMessage>| rows.len();
        self.run(StoreCall::Claim, claimed, self.inner.claim(lease, limit, in_flight))
            .await
    }
    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()> {
        let n = done.len();
        self.run(
            StoreCall::MarkPublished,
            move |_| n,
            self.inner.mark_published(lease, done),
        )
        .await
    }
    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
        let f = self.inner.mark_failed(lease, pos, error, retry_in);
        self.run(StoreCall::MarkFailed, one, f).await
    }
    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
        let f = self.inner.dead_letter(lease, pos, error, park);
        self.run(StoreCall::DeadLetter, one, f).await
    }
    fn wakeups(&self) -> Option<&dyn Wakeups> {
        self.inner.wakeups().map(|_| self as &dyn Wakeups)
    }
}

/// The wake-ups of a store that has none, for [`Observed`]'s calls through to its inner store's:
/// nothing ever wakes, no lane is ready, no transaction is open.
struct NoWakeups;

#[async_trait]
impl Wakeups for NoWakeups {
    async fn listen(&self) -> Result<BoxStream<'static, i32>> {
        Ok(Box::pin(futures::stream::pending()))
    }
    async fn set_idle(&self, _: &Lease, _: bool) -> Result<()> {
        Ok(())
    }
    async fn ready_lanes(&self, _: &[(i32, i64)]) -> Result<Vec<i32>> {
        Ok(Vec::new())
    }
}

impl<S: Store, O: Observer> Observed<S, O> {
    /// The inner store's wake-ups (always there when [`Store::wakeups`] handed out this one).
    fn inner_wakeups(&self) -> &dyn Wakeups {
        self.inner.wakeups().unwrap_or(&NoWakeups)
    }
}

#[async_trait]
impl<S: Store, O: Observer> Wakeups for Observed<S, O> {
    async fn listen(&self) -> Result<BoxStream<'static, i32>> {
        self.run(StoreCall::Listen, none, self.inner_wakeups().listen()).await
    }
    async fn set_idle(&self, lease: &Lease, idle: bool) -> Result<()> {
        let set = self.inner_wakeups().set_idle(lease, idle);
        self.run(StoreCall::SetIdle, none, set).await
    }
    async fn ready_lanes(&self, lanes: &[(i32, i64)]) -> Result<Vec<i32>> {
        let look = self.inner_wakeups().ready_lanes(lanes);
        self.run(StoreCall::ReadyLanes, none, look).await
    }
    async fn open_transactions(&self) -> Result<Vec<i64>> {
        let open = self.inner_wakeups().open_transactions();
        self.run(StoreCall::OpenTransactions, none, open).await
    }
    async fn still_open(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let open = self.inner_wakeups().still_open(ids);
        self.run(StoreCall::StillOpen, none, open).await
    }
}

#[async_trait]
impl<S: Store, O: Observer> StoreAdmin for Observed<S, O> {
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
