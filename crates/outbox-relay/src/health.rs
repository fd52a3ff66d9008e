//! What a running relay knows about itself, for readiness probes and consoles: how many lanes it
//! holds, how many messages it has published, and since when the broker has been unavailable.

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
}
