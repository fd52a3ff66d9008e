//! The publish rate the console shows: a sampler reads each relay's published count
//! ([`outbox_relay::RelayHealth::published`]) every second and keeps the samples of the last
//! [`WINDOW`]; the rate is the count now minus the oldest kept sample, divided by the time between
//! them. The sampler starts with the first console request (nothing runs for a daemon whose
//! console nobody opens), so the first page shows "measuring" until a second of history exists.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::admin::AdminState;

/// The span the rate is averaged over.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// How often the sampler reads the counters.
const EVERY: Duration = Duration::from_secs(1);
/// Less history than this gives no rate.
const MIN_SPAN: Duration = Duration::from_millis(900);

/// One database's recent samples: (when, published count), oldest first.
#[derive(Debug, Default)]
pub(crate) struct Window(VecDeque<(Instant, u64)>);

impl Window {
    /// Adds a sample and forgets the ones older than [`WINDOW`].
    pub(crate) fn push(&mut self, at: Instant, published: u64) {
        self.0.push_back((at, published));
        while self
            .0
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > WINDOW)
        {
            self.0.pop_front();
        }
    }

    /// Messages per second between the oldest kept sample and (`at`, `published`); `None` with less
    /// than [`MIN_SPAN`] of history.
    pub(crate) fn rate(&self, at: Instant, published: u64) -> Option<f64> {
        let (t0, n0) = self
            .0
            .iter()
            .find(|(t, _)| at.saturating_duration_since(*t) <= WINDOW + EVERY)?;
        let span = at.saturating_duration_since(*t0);
        (span >= MIN_SPAN).then(|| published.saturating_sub(*n0) as f64 / span.as_secs_f64())
    }
}

/// Samples of every database, by its index in [`AdminState::databases`].
#[derive(Debug, Default)]
pub(crate) struct Sampler {
    windows: Mutex<Vec<Window>>,
    started: OnceLock<()>,
}

impl Sampler {
    /// Starts the sampling task once; it ends when the admin state is dropped.
    pub(crate) fn start(self: &Arc<Self>, state: &Arc<AdminState>) {
        if self.started.set(()).is_err() {
            return;
        }
        let me = Arc::clone(self);
        let state: Weak<AdminState> = Arc::downgrade(state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(state) = state.upgrade() else { return };
                me.sample(&state, Instant::now());
            }
        });
    }

    fn sample(&self, state: &AdminState, at: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows.resize_with(state.databases.len(), Window::default);
        for (w, db) in windows.iter_mut().zip(&state.databases) {
            if let Some(c) = db.connected.get() {
                w.push(at, c.health.published());
            }
        }
    }

    /// The rate of database `index`, whose count is `published` now.
    pub(crate) fn rate(&self, index: usize, published: u64) -> Option<f64> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows.get(index)?.rate(Instant::now(), published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_over_the_kept_window() {
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        let mut w = Window::default();
        assert_eq!(w.rate(t, 0), None, "no history");
        w.push(t, 100);
        assert_eq!(w.rate(t + Duration::from_millis(200), 150), None, "too little history");
        assert_eq!(w.rate(s(2), 300), Some(100.0));
        for i in 1..=20 {
            w.push(s(i), 100 + 10 * i);
        }
        // Samples older than the window are gone: the rate is that of the last 10 s.
        assert_eq!(w.0.len(), 11);
        assert_eq!(w.rate(s(20), 300), Some(10.0));
        let idle = w.rate(s(21), 300).unwrap();
        assert!(
            (idle - 100.0 / 11.0).abs() < 1e-9,
            "a quiet second lowers the rate: {idle}"
        );
    }

    #[test]
    fn a_stale_window_gives_no_rate() {
        let t = Instant::now();
        let mut w = Window::default();
        w.push(t, 5);
        assert_eq!(w.rate(t + Duration::from_secs(60), 5), None);
    }
}
