//! The adaptive pace: the relay gives the database back to the service when the service needs it.
//!
//! The signal is the store's probe (see [`outbox::Store::probe`]), the smallest transaction that
//! commits like a service's. Every [`CYCLE`] the controller times it [`WORKING_PROBES`] times
//! while the relay works, then holds every lane back for a moment (a quiet window: no round
//! starts, those under way finish) and times it again. Three figures come out:
//!
//! - *quiet*: how long a commit takes without the relay; its fastest of the last [`BASELINE`] is
//!   the *baseline*, the database at rest;
//! - *working*: how long a commit takes while the relay works;
//! - whether a service is *busy*: where the database counts its transactions (PostgreSQL), when
//!   they grow by more than [`BUSY_RATE`](counts::BUSY_RATE) a second beyond the relay's own (which the relay counts)
//!   and beyond as many again (another relay as busy as this one is no service). Two counts tell:
//!   the finished transactions over the last [`RATE_WINDOW`](counts::RATE_WINDOW) (every kind, but each connection adds
//!   its count only about once a second), and the transaction ids handed out over the last
//!   [`WRITES_WINDOW`](counts::WRITES_WINDOW) (writes only, live; with twice the margin, a few probes being a short
//!   span). Elsewhere, when quiet is well above the baseline.
//!
//! A service's transactions wait for their commits, so its throughput falls as commits slow down.
//! With no busy service the pace doubles (up to every lane). When a service becomes busy the pace
//! drops at once to [`BUSY_START`]: at the probe whose counts tell, without waiting for the end of
//! the cycle, and the permits above the pace go as their lanes' turns end. While it stays busy
//! the relay keeps working within
//! [`RelayConfig::pace_slowdown`](crate::RelayConfig::pace_slowdown) of quiet: above, the pace is
//! cut in proportion; below, it grows by [`FLOOR`]. The
//! pace is a number of lanes allowed to work at once; below one, the one lane that works rests
//! after each full round in proportion (at 0.25 it works a quarter of the time), down to
//! [`FLOOR`]; not after a short one, which means it has caught up. It
//! starts at one lane. `max_busy_lanes` and `max_rate` stay hard caps on top.
//!
//! Only lanes that catch up are paced (their last claim was full): a lane that keeps up publishes
//! what the service writes as it writes it, and holding it back would only add latency. And while
//! the oldest row claimed (or the rows behind a resting lane's batch, [`Adaptive::rest`]) has
//! waited longer than [`RelayConfig::pace_max_lag`](crate::RelayConfig::pace_max_lag), the pace
//! stays at one lane or more: a peak that lasts makes the backlog wait, but not for ever.
//!
//! Lanes that keep up are spared the gate but not the signal: while the relay slows commits, the
//! lingering lanes are looked at less often when
//! [`RelayConfig::linger_poll_max`](crate::RelayConfig::linger_poll_max) allows ([`gather`]), so each
//! claim and mark carries more rows. The look waits out the quiet window too (up to one interval).
//! The same counts tell whether lanes linger at all ([`lanes_linger`]): only while others write
//! often enough for NOTIFY to cost them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{ProbeCounts, Publisher, Store, LANES};
use tokio::sync::{watch, Semaphore, SemaphorePermit};

use crate::shared::Shared;
use counts::Counts;
use gather::Gather;

mod counts;
pub(crate) mod gather;

/// One control cycle: working probes, then the quiet window.
pub(crate) const CYCLE: Duration = Duration::from_secs(1);
/// Probes taken while the relay works, spread over the cycle.
const WORKING_PROBES: u32 = 8;
/// Probes taken in the quiet window.
const QUIET_PROBES: usize = 3;
/// The longest a probe is waited for: a slower one (a commit that hangs: a synchronous standby gone,
/// a pool without a free connection) counts as taking this long, without the database's counts, so
/// the quiet window, which holds every lane catching up, stays short, and the cycle goes on (and
/// finds the database slow).
const PROBE_MAX: Duration = CYCLE;
/// The longest the quiet window waits for the rounds under way to finish.
const QUIET_WAIT: Duration = Duration::from_millis(300);
/// How far back the baseline looks: long enough to remember a database at rest through minutes of
/// load, short enough to learn a slower path to a new one.
const BASELINE: Duration = Duration::from_secs(300);
/// The longest round a rest is measured from: a round that took longer waited (a statement on a
/// lock, a write retried, the broker) more than it worked the database, and at the floor a rest of
/// 19 times a 10 s lock wait would leave the backlog alone for three minutes.
const ROUND_COUNTED: Duration = Duration::from_secs(1);
/// How often a resting lane looks at the pace again.
const REST_SLICE: Duration = Duration::from_millis(100);
/// The lowest pace: one lane working 5% of the time.
const FLOOR: f64 = 0.05;
/// Where the pace drops at once when a service becomes busy (the proportional cuts take over from
/// there): a service should not wait cycles for a relay that was running every lane.
const BUSY_START: f64 = 0.25;

/// Whether the lanes linger ([`crate::linger`]), given the others' writes a second, whether they
/// lingered and [`RelayConfig::linger_above_writes`](crate::RelayConfig::linger_above_writes):
/// above it they do, below half of it they stop; at 0 always.
pub(crate) fn lanes_linger(writes: f64, lingered: bool, above: f64) -> bool {
    above == 0.0 || writes > if lingered { above / 2.0 } else { above }
}

/// Whether a service is committing: quiet commits take well over the baseline (half as long again
/// and half a millisecond more).
pub(crate) fn busy(quiet: Duration, baseline: Duration) -> bool {
    quiet > baseline.mul_f64(1.5) + Duration::from_micros(500)
}

/// The pace the lanes follow.
#[derive(Debug)]
pub(crate) struct Adaptive {
    gate: Semaphore,
    /// The gate's permits: how many there are and how many the pace wants.
    permits: Mutex<Permits>,
    /// The pace in thousandths of a lane.
    milli: AtomicU32,
    /// True during the quiet window: no round starts.
    quiet: watch::Sender<bool>,
    /// Rounds under way.
    active: AtomicUsize,
    /// The relay's own database transactions so far.
    own: AtomicU64,
    /// Those of them that write (take a transaction id), counted per call: where the store
    /// counts its own statements (`ProbeCounts::own_writes`), the others' writes use that instead.
    own_writes: AtomicU64,
    /// How long the oldest row claimed since the last cycle had waited, in milliseconds.
    lag_ms: AtomicU64,
    /// How often the lingering lanes are looked at, in microseconds (0: not set yet).
    watch_us: AtomicU64,
    /// Whether lanes linger after running dry: true until the database's counts tell
    /// ([`lanes_linger`]).
    linger: AtomicBool,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            gate: Semaphore::new(1),
            permits: Mutex::new(Permits { held: 1, want: 1 }),
            milli: AtomicU32::new(1000),
            quiet: watch::Sender::new(false),
            active: AtomicUsize::new(0),
            own: AtomicU64::new(0),
            own_writes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            watch_us: AtomicU64::new(0),
            linger: AtomicBool::new(true),
        }
    }
}

/// The gate's permits, in and out of use, against the number the pace wants.
#[derive(Debug)]
struct Permits {
    held: usize,
    want: usize,
}

/// A lane's turn to work: a permit of the gate, counted as a round under way until
/// [`Turn::resting`] or its drop.
pub(crate) struct Turn<'a> {
    permit: Option<SemaphorePermit<'a>>,
    pace: &'a Adaptive,
    active: bool,
}

impl Turn<'_> {
    /// The round's work is done (the lane may still hold the turn while it rests).
    pub(crate) fn resting(&mut self) {
        if std::mem::take(&mut self.active) {
            self.pace.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.resting();
        // A permit the pace no longer wants goes as its turn ends, not at the next cycle: a
        // relay running every lane when a service wakes up is down to its pace after one round.
        let mut permits = self.pace.permits.lock().expect("never poisoned");
        if permits.held > permits.want {
            permits.held -= 1;
            if let Some(p) = self.permit.take() {
                p.forget();
            }
        }
    }
}

impl Adaptive {
    /// Counts one of the relay's own database transactions; `writes`: it takes a transaction id.
    pub(crate) fn count_own(&self, writes: bool) {
        self.own.fetch_add(1, Ordering::Relaxed);
        if writes {
            self.own_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Notes how long the oldest row of a claim had waited.
    pub(crate) fn saw_lag(&self, lag: Duration) {
        self.lag_ms
            .fetch_max(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Waits for a turn to work (never during the quiet window).
    pub(crate) async fn turn(&self) -> Turn<'_> {
        let mut quiet = self.quiet.subscribe();
        loop {
            let _ = quiet.wait_for(|q| !q).await;
            let permit = self.gate.acquire().await.expect("the semaphore is never closed");
            self.active.fetch_add(1, Ordering::AcqRel);
            let turn = Turn {
                permit: Some(permit),
                pace: self,
                active: true,
            };
            if !*quiet.borrow() {
                return turn;
            }
            // The window began while this lane waited for the gate: give way.
            drop(turn);
        }
    }

    /// Rests after a full round that took `took`, as long as the pace asks, which it asks again
    /// every [`REST_SLICE`]: a pace that rose (to one lane or more: the rest ends) shortens it. The
    /// rows behind the round's batch wait meanwhile, and that wait (from `behind_since`, when its
    /// newest row was committed) counts as the lag: without it a lane resting after a slow round
    /// (at the floor, 19 times up to [`ROUND_COUNTED`] of it) would see no lag until its next
    /// claim, and `pace_max_lag` would not bound the wait. True if `stop` came.
    pub(crate) async fn rest(
        &self,
        stop: &tokio_util::sync::CancellationToken,
        took: Duration,
        behind_since: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        let began = Instant::now();
        loop {
            let left = (began + self.pause_after(took)).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.saw_lag((chrono::Utc::now() - behind_since).to_std().unwrap_or_default());
            if crate::waits::pause(stop, left.min(REST_SLICE)).await {
                return true;
            }
        }
    }

    /// How long a lane rests after a round that took `took` (counted up to [`ROUND_COUNTED`]), at
    /// the current pace.
    pub(crate) fn pause_after(&self, took: Duration) -> Duration {
        let level = self.level();
        if level >= 1.0 {
            Duration::ZERO
        } else {
            took.min(ROUND_COUNTED).mul_f64(1.0 / level - 1.0)
        }
    }

    /// How long the lingering lanes go between two looks ([`gather`]): `floor` until the
    /// controller sets it.
    pub(crate) fn watch_every(&self, floor: Duration) -> Duration {
        match self.watch_us.load(Ordering::Relaxed) {
            0 => floor,
            us => Duration::from_micros(us),
        }
    }

    /// Whether lanes linger after running dry now ([`lanes_linger`]).
    pub(crate) fn lingers(&self) -> bool {
        self.linger.load(Ordering::Relaxed)
    }

    /// Whether the quiet window is on (no round starts).
    pub(crate) fn is_quiet(&self) -> bool {
        *self.quiet.borrow()
    }

    /// Completes outside the quiet window.
    pub(crate) async fn not_quiet(&self) {
        let _ = self.quiet.subscribe().wait_for(|q| !q).await;
    }

    pub(crate) fn level(&self) -> f64 {
        f64::from(self.milli.load(Ordering::Relaxed)) / 1000.0
    }
}

/// The controller's state: the baseline, the counts and the pace.
struct Control {
    /// The fastest quiet commit of each cycle, for the last [`BASELINE`].
    quiet: VecDeque<(Instant, Duration)>,
    /// The database's counts at each probe of the last [`counts::RATE_WINDOW`].
    counts: Counts,
    level: f64,
    /// Whether the last cycle found a busy service.
    was_busy: bool,
    /// How much slower a commit may get while the relay works, against quiet, when a service is
    /// busy ([`crate::RelayConfig::pace_slowdown`]).
    slowdown: f64,
}

impl Control {
    fn new(slowdown: f64) -> Self {
        Control {
            quiet: VecDeque::new(),
            counts: Counts::default(),
            level: 1.0,
            was_busy: false,
            slowdown,
        }
    }

    /// Takes one cycle's figures and returns the new pace. `service` says whether a service is
    /// busy when the transaction counts tell; otherwise quiet against the baseline does.
    fn cycle(&mut self, quiet: Duration, working: Duration, service: Option<bool>, now: Instant) -> f64 {
        self.quiet.push_back((now, quiet));
        while self
            .quiet
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > BASELINE)
        {
            self.quiet.pop_front();
        }
        let baseline = self.quiet.iter().map(|(_, d)| *d).min().unwrap_or(quiet);
        let most = f64::from(LANES);
        let service = service.unwrap_or_else(|| busy(quiet, baseline));
        if service && !self.was_busy {
            return self.became_busy();
        }
        self.was_busy = service;
        self.level = if !service {
            (self.level * 2.0).min(most)
        } else {
            let allowed = quiet.mul_f64(1.0 + self.slowdown);
            if working > allowed {
                let cut = (allowed.as_secs_f64() / working.as_secs_f64()).clamp(0.1, 0.7);
                (self.level * cut).max(FLOOR)
            } else {
                // Slowly: one cycle's quick answers may be luck, and the service comes first.
                (self.level + FLOOR).min(most)
            }
        };
        self.level
    }

    /// A service became busy: the pace drops at once to [`BUSY_START`]. Returns the pace.
    fn became_busy(&mut self) -> f64 {
        self.was_busy = true;
        self.level = self.level.min(BUSY_START);
        self.level
    }

    /// While the oldest row claimed has waited longer than `max`, at least one lane works without
    /// rest. Returns the pace.
    fn bound_lag(&mut self, lag: Duration, max: Duration) -> f64 {
        if lag > max {
            self.level = self.level.max(1.0);
        }
        self.level
    }

    /// Sets the gate to the pace: whole lanes as permits (at least one).
    fn apply(&self, pace: &Adaptive) {
        pace.milli.store((self.level * 1000.0) as u32, Ordering::Relaxed);
        let mut permits = pace.permits.lock().expect("never poisoned");
        permits.want = (self.level.ceil() as usize).clamp(1, LANES as usize);
        if permits.want > permits.held {
            pace.gate.add_permits(permits.want - permits.held);
            permits.held = permits.want;
        } else if permits.want < permits.held {
            // Only free permits can go here; the others go as their turns end.
            permits.held -= pace.gate.forget_permits(permits.held - permits.want);
        }
    }
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

/// Times the store's probe: how long it took and the database's transaction counts (see
/// [`outbox::Store::probe`]); `None` when it failed, [`PROBE_MAX`] without counts when it did not
/// answer within that.
async fn probe<S: Store, P: Publisher>(shared: &Shared<S, P>) -> Option<(Duration, Option<ProbeCounts>)> {
    let start = Instant::now();
    match tokio::time::timeout(PROBE_MAX, shared.counted_write(shared.store.probe())).await {
        Ok(Ok(count)) => Some((start.elapsed(), Some(count))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "pace probe failed");
            None
        }
        Err(_) => {
            tracing::debug!(took_ms = PROBE_MAX.as_millis() as u64, "pace probe did not answer");
            Some((PROBE_MAX, None))
        }
    }
}

/// Runs the controller while the relay runs (returns at once without an adaptive pace).
pub(crate) async fn control<S: Store, P: Publisher>(shared: Arc<Shared<S, P>>) {
    let Some(pace) = &shared.adaptive else {
        return;
    };
    let cfg = &shared.cfg;
    let mut c = Control::new(cfg.pace_slowdown);
    let mut gather = Gather::new(cfg.linger_poll_interval, cfg.linger_poll_max, cfg.linger);
    loop {
        let mut working = Vec::new();
        let mut service = None;
        for _ in 0..WORKING_PROBES {
            tokio::time::sleep(CYCLE / WORKING_PROBES).await;
            if let Some((took, count)) = probe(&shared).await {
                working.push(took);
                let Some(count) = count else {
                    continue;
                };
                let (own, own_writes) = (
                    pace.own.load(Ordering::Relaxed),
                    pace.own_writes.load(Ordering::Relaxed),
                );
                service = c.counts.record(count, own, own_writes, Instant::now());
                if let Some(writes) = c.counts.others_writes() {
                    let lingered = pace.lingers();
                    let lingers = lanes_linger(writes, lingered, shared.cfg.linger_above_writes);
                    if lingers != lingered {
                        tracing::debug!(writes, lingers, "pace: lanes linger after running dry");
                        pace.linger.store(lingers, Ordering::Relaxed);
                    }
                }
            }
            if service == Some(true) && !c.was_busy {
                // A service woke up: the pace drops now, not at the end of the cycle (still at
                // one lane or more while the backlog waited past `pace_max_lag`; the cycle's end
                // takes the lag seen).
                c.became_busy();
                let lag = Duration::from_millis(pace.lag_ms.load(Ordering::Relaxed));
                let level = c.bound_lag(lag, shared.cfg.pace_max_lag);
                c.apply(pace);
                shared.meters.pace.set(level);
                tracing::debug!(level, "pace: a service became busy");
                break;
            }
        }
        pace.quiet.send_replace(true);
        let waited = Instant::now();
        while pace.active.load(Ordering::Acquire) > 0 && waited.elapsed() < QUIET_WAIT {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut quiet = Vec::new();
        for _ in 0..QUIET_PROBES {
            match probe(&shared).await {
                Some((took, Some(_))) => quiet.push(took),
                // The lanes wait while the window lasts: not for more probes that do not answer.
                Some((took, None)) => {
                    quiet.push(took);
                    break;
                }
                None => break,
            }
        }
        pace.quiet.send_replace(false);
        let lag = Duration::from_millis(pace.lag_ms.swap(0, Ordering::Relaxed));
        let (Some(quiet), Some(working)) = (median(quiet), median(working)) else {
            // Nothing measured: the pace stays, but the lag still bounds it.
            shared.meters.pace.set(c.bound_lag(lag, shared.cfg.pace_max_lag));
            c.apply(pace);
            continue;
        };
        let now = Instant::now();
        c.cycle(quiet, working, service, now);
        let every = gather.cycle(quiet, working, c.slowdown);
        pace.watch_us.store(
            u64::try_from(every.as_micros()).unwrap_or(u64::MAX).max(1),
            Ordering::Relaxed,
        );
        let level = c.bound_lag(lag, shared.cfg.pace_max_lag);
        c.apply(pace);
        shared.meters.pace.set(level);
        tracing::debug!(
            level,
            quiet_us = quiet.as_micros() as u64,
            working_us = working.as_micros() as u64,
            ?service,
            lag_ms = lag.as_millis() as u64,
            watch_ms = every.as_secs_f64() * 1000.0,
            "pace"
        );
    }
}

#[cfg(test)]
mod tests;
