//! The adaptive pace: the relay gives the database back to the service when the service needs it.
//!
//! Every [`PROBE_EVERY`] a controller times the store's probe, the smallest transaction that
//! commits like a service's (see [`outbox::Store::probe`]). The median of the
//! last few against the fastest of the last [`BASELINE`] says how long the database makes a query
//! wait now. Waiting well above that baseline means something is competing for the database (the
//! relay's own lanes or the service's transactions): the pace is halved (at most every
//! [`CUT_EVERY`], so a cut shows its effect first); otherwise it grows by a step. The pace is a
//! number of lanes allowed to work at once; below one, the one lane that works pauses after each
//! round in proportion (at 0.25 it works a quarter of the time). `max_busy_lanes` and `max_rate`
//! stay hard caps on top.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Publisher, Store, LANES};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::lane::Shared;

/// How often the database's answer is timed.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How far back the baseline (the fastest answer) looks: long enough to remember a quiet database
/// through minutes of load, short enough to learn a slower path to a new one.
const BASELINE: Duration = Duration::from_secs(300);
/// Answers taken for the current wait (their median).
const RECENT: usize = 5;
/// At least this long between two cuts.
const CUT_EVERY: Duration = Duration::from_millis(300);
/// The lowest pace: one lane working 5% of the time.
const FLOOR: f64 = 0.05;
/// Growth per probe without congestion.
const STEP: f64 = 0.25;

/// Whether the current wait says the database is contended: more than twice the baseline and a
/// millisecond above it (a local database answers a trivial query in well under one).
pub(crate) fn congested(current: Duration, baseline: Duration) -> bool {
    current > baseline * 2 && current > baseline + Duration::from_millis(1)
}

/// The pace the lanes follow.
#[derive(Debug)]
pub(crate) struct Adaptive {
    gate: Semaphore,
    /// The pace in thousandths of a lane.
    milli: AtomicU32,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            gate: Semaphore::new(1),
            milli: AtomicU32::new(1000),
        }
    }
}

impl Adaptive {
    /// Waits for a turn to work.
    pub(crate) async fn turn(&self) -> SemaphorePermit<'_> {
        self.gate.acquire().await.expect("the semaphore is never closed")
    }

    /// How long a lane pauses after a round that took `took`, at the current pace.
    pub(crate) fn pause_after(&self, took: Duration) -> Duration {
        let level = self.level();
        if level >= 1.0 {
            Duration::ZERO
        } else {
            took.mul_f64(1.0 / level - 1.0)
        }
    }

    pub(crate) fn level(&self) -> f64 {
        f64::from(self.milli.load(Ordering::Relaxed)) / 1000.0
    }
}

/// The controller's state: recent answers, the baseline, the pace and the gate's permits.
struct Control {
    recent: VecDeque<Duration>,
    /// The fastest answer of each second, for the last [`BASELINE`].
    fastest: VecDeque<(Instant, Duration)>,
    level: f64,
    permits: usize,
    last_cut: Option<Instant>,
    /// Until the first sign of contention the pace doubles per quick answer (it starts at one lane,
    /// so the first answers, the baseline, come from a database the relay does not load yet).
    slow_start: bool,
}

impl Control {
    fn new() -> Self {
        Control {
            recent: VecDeque::with_capacity(RECENT),
            fastest: VecDeque::new(),
            level: 1.0,
            permits: 1,
            last_cut: None,
            slow_start: true,
        }
    }

    /// Takes one timed answer and returns the new pace.
    fn observe(&mut self, took: Duration, now: Instant) -> f64 {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(took);
        match self.fastest.back_mut() {
            Some((at, best)) if now.duration_since(*at) < Duration::from_secs(1) => *best = (*best).min(took),
            _ => self.fastest.push_back((now, took)),
        }
        while self
            .fastest
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > BASELINE)
        {
            self.fastest.pop_front();
        }
        let baseline = self.fastest.iter().map(|(_, d)| *d).min().unwrap_or(took);
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort();
        let current = sorted[sorted.len() / 2];
        if congested(current, baseline) {
            self.slow_start = false;
            if self.last_cut.is_none_or(|at| now.duration_since(at) >= CUT_EVERY) {
                self.level = (self.level / 2.0).max(FLOOR);
                self.last_cut = Some(now);
            }
        } else if self.slow_start {
            self.level = (self.level * 2.0).min(f64::from(LANES));
        } else {
            self.level = (self.level + STEP).min(f64::from(LANES));
        }
        self.level
    }

    /// Sets the gate to the pace: whole lanes as permits (at least one).
    fn apply(&mut self, pace: &Adaptive) {
        pace.milli.store((self.level * 1000.0) as u32, Ordering::Relaxed);
        let want = (self.level.ceil() as usize).clamp(1, LANES as usize);
        if want > self.permits {
            pace.gate.add_permits(want - self.permits);
            self.permits = want;
        } else if want < self.permits {
            // Only free permits can go; the rest go on a later probe, once their lanes finish.
            self.permits -= pace.gate.forget_permits(self.permits - want);
        }
    }
}

/// Runs the controller while the relay runs (returns at once without an adaptive pace).
pub(crate) async fn control<S: Store, P: Publisher>(shared: Arc<Shared<S, P>>) {
    let Some(pace) = &shared.adaptive else {
        return;
    };
    let mut c = Control::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let start = Instant::now();
        if let Err(e) = shared.store.probe().await {
            tracing::debug!(error = %e, "pace probe failed");
            continue;
        }
        let level = c.observe(start.elapsed(), Instant::now());
        c.apply(pace);
        shared.meters.pace.set(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_slow_database_cuts_the_pace_to_the_floor_and_a_quick_one_restores_it() {
        let mut c = Control::new();
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..10 {
            c.observe(Duration::from_micros(200), now);
            now += PROBE_EVERY;
        }
        assert_eq!(
            c.level,
            f64::from(LANES),
            "a quick database: full pace (doubling from one lane)"
        );
        let mut cuts = 0;
        for _ in 0..200 {
            let before = c.level;
            c.observe(ms(8), now);
            if c.level < before {
                cuts += 1;
            }
            now += PROBE_EVERY;
        }
        assert_eq!(c.level, FLOOR, "a slow database: the floor");
        assert!(cuts <= 200 * PROBE_EVERY.as_millis() as usize / CUT_EVERY.as_millis() as usize + 1);
        for _ in 0..10 {
            c.observe(Duration::from_micros(250), now);
            now += PROBE_EVERY;
        }
        assert!(c.level > 1.0, "quick answers again: the pace grows ({})", c.level);
    }

    #[test]
    fn the_baseline_forgets_answers_older_than_its_window() {
        let mut c = Control::new();
        let mut now = Instant::now();
        c.observe(Duration::from_micros(100), now);
        // 5 ms answers: congested against 0.1 ms at first, the new normal once that one is old.
        for _ in 0..(BASELINE.as_millis() / PROBE_EVERY.as_millis() + 100) {
            now += PROBE_EVERY;
            c.observe(ms(5), now);
        }
        let low = c.level;
        for _ in 0..20 {
            now += PROBE_EVERY;
            c.observe(ms(5), now);
        }
        assert!(
            c.level > low,
            "5 ms is the baseline after {BASELINE:?}: the pace grows again"
        );
    }

    #[test]
    fn below_one_lane_the_lane_pauses_in_proportion() {
        let pace = Adaptive::default();
        assert_eq!(pace.pause_after(ms(10)), Duration::ZERO);
        pace.milli.store(250, Ordering::Relaxed);
        assert_eq!(pace.pause_after(ms(10)), ms(30));
    }

    #[tokio::test]
    async fn the_gate_lets_as_many_lanes_work_as_the_pace_allows() {
        let pace = Adaptive::default();
        let mut c = Control::new();
        c.level = 2.5;
        c.apply(&pace);
        let a = pace.turn().await;
        let b = pace.turn().await;
        let _c = pace.turn().await;
        assert!(pace.gate.try_acquire().is_err(), "3 permits at 2.5 lanes");
        c.level = 1.0;
        c.apply(&pace);
        assert_eq!(c.permits, 3, "every permit in use: none taken back yet");
        drop((a, b));
        c.apply(&pace);
        assert_eq!(c.permits, 1, "taken back once their lanes finished");
        assert!(pace.gate.try_acquire().is_err());
    }
}
