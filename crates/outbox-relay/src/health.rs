//! What a running relay knows about itself, for readiness probes and consoles: how many lanes it
//! holds, how many messages it has published, since when the broker has been unavailable, and
//! which lanes' store writes have been failing since when.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cheap, cloneable view of a relay's state, updated by the relay while it runs
/// ([`crate::Relay::health`]).
#[derive(Clone, Debug, Default)]
pub struct RelayHealth(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    published: AtomicU64,
    lanes_held: AtomicUsize,
    /// When a publish first answered `Unavailable` since the last one that reached the broker.
    unavailable_since: Mutex<Option<Instant>>,
    /// Lanes whose store write (a mark) is being retried: since when, and the last error.
    store_failing: Mutex<BTreeMap<i32, (Instant, String)>>,
}

/// A lane whose store write has failed and is being retried ([`RelayHealth::store_failing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreFailing {
    /// The lane.
    pub lane: i32,
    /// Since the first failure of the write (the lane holds its lease and batch meanwhile).
    pub for_: Duration,
    /// The last error.
    pub error: String,
}

impl RelayHealth {
    /// Messages published (confirmed and marked) since the relay started.
    pub fn published(&self) -> u64 {
        self.0.published.load(Relaxed)
    }

    /// Lanes this relay holds now.
    pub fn lanes_held(&self) -> usize {
        self.0.lanes_held.load(Relaxed)
    }

    /// How long the broker has been unavailable: `Some` from the first publish that found it
    /// unreachable until a publish reaches it again (a message confirmed, or refused for a
    /// reason of its own), `None` while it answers.
    pub fn broker_unavailable_for(&self) -> Option<Duration> {
        self.lock().map(|since| since.elapsed())
    }

    /// Lanes whose store write (marking a batch published, failed or dead) has been failing, each
    /// since its first failure: such a lane keeps its lease and retries, so nothing else shows it.
    pub fn store_failing(&self) -> Vec<StoreFailing> {
        let failing = self.0.store_failing.lock().unwrap_or_else(|p| p.into_inner());
        failing
            .iter()
            .map(|(lane, (since, error))| StoreFailing {
                lane: *lane,
                for_: since.elapsed(),
                error: error.clone(),
            })
            .collect()
    }

    /// Records a failed store write of `lane` (keeping the first instant).
    pub(crate) fn store_failed(&self, lane: i32, error: String) {
        let mut failing = self.0.store_failing.lock().unwrap_or_else(|p| p.into_inner());
        failing.entry(lane).or_insert_with(|| (Instant::now(), String::new())).1 = error;
    }

    /// The lane's store write is no longer failing (it succeeded, or the lane gave up).
    pub(crate) fn store_settled(&self, lane: i32) {
        let mut failing = self.0.store_failing.lock().unwrap_or_else(|p| p.into_inner());
        failing.remove(&lane);
    }

    pub(crate) fn add_published(&self, n: usize) {
        self.0.published.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn set_lanes_held(&self, n: usize) {
        self.0.lanes_held.store(n, Relaxed);
    }

    /// Records one publish round's outcome: `reached` when the broker answered.
    pub(crate) fn broker(&self, reached: bool) {
        let mut since = self.0.unavailable_since.lock().unwrap_or_else(|p| p.into_inner());
        match (reached, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    fn lock(&self) -> Option<Instant> {
        *self.0.unavailable_since.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_lasts_from_the_first_failure_until_the_broker_answers() {
        let h = RelayHealth::default();
        assert_eq!(h.broker_unavailable_for(), None);
        h.broker(false);
        let first = h.broker_unavailable_for().expect("unavailable");
        std::thread::sleep(Duration::from_millis(5));
        h.broker(false);
        assert!(
            h.broker_unavailable_for().expect("still unavailable") > first,
            "kept the first instant"
        );
        h.broker(true);
        assert_eq!(h.broker_unavailable_for(), None);
        h.add_published(3);
        h.set_lanes_held(4);
        assert_eq!((h.published(), h.lanes_held()), (3, 4));
    }

    #[test]
    fn a_failing_store_write_lasts_from_its_first_failure_with_the_last_error() {
        let h = RelayHealth::default();
        h.store_failed(7, "first".into());
        std::thread::sleep(Duration::from_millis(5));
        h.store_failed(7, "second".into());
        h.store_failed(2, "other".into());
        let failing = h.store_failing();
        assert_eq!(failing.iter().map(|f| f.lane).collect::<Vec<_>>(), [2, 7]);
        assert_eq!(failing[1].error, "second");
        assert!(failing[1].for_ >= Duration::from_millis(5), "kept the first instant");
        h.store_settled(7);
        h.store_settled(2);
        assert!(h.store_failing().is_empty());
    }
}
