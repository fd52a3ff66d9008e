//! What every lane of a relay shares: the store, the publisher, the settings, the wake-ups, the
//! paces and the meters.

use outbox::Backoff;
use tokio::sync::{Notify, Semaphore};

use crate::config::RelayConfig;
use crate::metrics as m;

pub(crate) struct Shared<S, P> {
    pub(crate) store: S,
    pub(crate) publisher: P,
    pub(crate) cfg: RelayConfig,
    /// One wake-up per lane, this relay's own: NOTIFY payloads and the linger's watch.
    pub(crate) wake: Vec<Notify>,
    /// The writers' in-process wake-up ([`crate::Relay::wake_on`]), when embedded beside them.
    pub(crate) local: Option<outbox::LocalWakeup>,
    /// Turns to work, when [`RelayConfig::max_busy_lanes`] is set.
    pub(crate) busy: Option<Semaphore>,
    /// The adaptive pace, when [`RelayConfig::adaptive_pace`] is on.
    pub(crate) adaptive: Option<crate::pace::Adaptive>,
    /// The pace, when [`RelayConfig::max_rate`] is set.
    pub(crate) rate: Option<governor::DefaultDirectRateLimiter>,
    /// Retry delays ([`RelayConfig::backoff_base`] to [`RelayConfig::backoff_max`]).
    pub(crate) backoff: Backoff,
    pub(crate) meters: m::Meters,
    pub(crate) health: crate::RelayHealth,
    /// Lanes that linger after running dry (see [`crate::linger`]).
    pub(crate) watched: crate::linger::Watched,
}

impl<S, P> Shared<S, P> {
    /// Wakes `lane` (NOTIFY, the linger's watch), or its next wait when it is busy; a lane out of
    /// range (a stray NOTIFY payload): nothing.
    pub(crate) fn wake_lane(&self, lane: i32) {
        if let Some(w) = usize::try_from(lane).ok().and_then(|l| self.wake.get(l)) {
            w.notify_one();
        }
    }

    /// Completes when `lane` is woken: by NOTIFY, the linger's watch or a commit in this process.
    pub(crate) async fn woken(&self, lane: i32) {
        let own = self.wake[lane as usize].notified();
        match &self.local {
            Some(local) => tokio::select! {
                _ = own => {}
                _ = local.notified(lane) => {}
            },
            None => own.await,
        }
    }

    /// Runs one of the relay's own database transactions that only reads, counted for the
    /// adaptive pace (which tells them from the service's).
    pub(crate) async fn counted<T>(&self, tx: impl std::future::Future<Output = T>) -> T {
        if let Some(pace) = &self.adaptive {
            pace.count_own(false);
        }
        tx.await
    }

    /// [`Shared::counted`] for a transaction that writes (takes a transaction id).
    pub(crate) async fn counted_write<T>(&self, tx: impl std::future::Future<Output = T>) -> T {
        if let Some(pace) = &self.adaptive {
            pace.count_own(true);
        }
        tx.await
    }
}
