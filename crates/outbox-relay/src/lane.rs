//! One lane's loop: claim a batch, publish it, settle every row (mark published, back off, or
//! dead-letter), in per-key order. One batch in flight per lane.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Backoff, Lease, Publisher, Store, StoredMessage};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::batch::publish_batch;
use crate::config::{ClaimAhead, RelayConfig};
use crate::metrics as m;

pub(crate) struct Shared<S, P> {
    pub(crate) store: S,
    pub(crate) publisher: P,
    pub(crate) cfg: RelayConfig,
    /// One wake-up per lane (NOTIFY payload or in-process commit).
    pub(crate) wake: Vec<Notify>,
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

/// Why a lane loop ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LaneExit {
    /// Asked to stop (shutdown or rebalance); the lease is still ours.
    Stopped,
    /// Another relay took the lane over.
    Lost,
}

impl<S, P> Shared<S, P> {
    /// Runs one of the relay's own database transactions, counted for the adaptive pace (which
    /// tells them from the service's).
    pub(crate) async fn counted<T>(&self, tx: impl std::future::Future<Output = T>) -> T {
        if let Some(pace) = &self.adaptive {
            pace.count_own();
        }
        tx.await
    }
}

pub(crate) async fn run_lane<S: Store, P: Publisher>(
    shared: Arc<Shared<S, P>>,
    lease: Lease,
    stop: CancellationToken,
) -> LaneExit {
    let span = tracing::info_span!(
        "lane",
        database = shared.cfg.name.as_deref(),
        lane = lease.lane,
        epoch = lease.epoch
    );
    async move {
        tracing::debug!("lane started");
        let mut store_errors = 0;
        let mut idle = false;
        let lingers = crate::linger::enabled(&shared);
        // Until when the lane keeps watching for rows after it ran dry, flag still busy.
        let mut linger_until: Option<Instant> = None;
        // The batch claimed while the previous one was being published, if any.
        let mut ahead: Option<Vec<StoredMessage>> = None;
        // How long the lane's last claim and last publish took (for `ClaimAhead::Auto`).
        let (mut claim_took, mut publish_took) = (Duration::ZERO, Duration::ZERO);
        // Rounds in a row in which the broker was unavailable (for the lane's backoff).
        let mut outages = 0;
        loop {
            if stop.is_cancelled() {
                return LaneExit::Stopped;
            }
            // Held for this round's claim and publish; given back before waiting for work.
            let capped = match &shared.busy {
                Some(busy) => tokio::select! {
                    permit = busy.acquire() => Some(permit.expect("the semaphore is never closed")),
                    _ = stop.cancelled() => return LaneExit::Stopped,
                },
                None => None,
            };
            let paced = match &shared.adaptive {
                Some(pace) => tokio::select! {
                    permit = pace.turn() => Some(permit),
                    _ = stop.cancelled() => return LaneExit::Stopped,
                },
                None => None,
            };
            let mut turn = (capped, paced);
            let round_started = Instant::now();
            let rows = match ahead.take().filter(|r| !r.is_empty()) {
                Some(rows) => rows,
                None => match timed(shared.counted(shared.store.claim(&lease, shared.cfg.batch_size, &[]))).await {
                    (Ok(rows), took) => {
                        store_errors = 0;
                        claim_took = took;
                        rows
                    }
                    (Err(e), _) => {
                        drop(turn);
                        store_errors += 1;
                        shared.meters.store_errors.increment(1);
                        tracing::warn!(error = %e, "claim failed; retrying");
                        if pause(&stop, shared.backoff.delay(store_errors)).await {
                            return LaneExit::Stopped;
                        }
                        continue;
                    }
                },
            };
            let full = rows.len() == shared.cfg.batch_size;
            if rows.is_empty() {
                drop(turn);
                if let Some(until) = linger_until.filter(|u| *u > Instant::now()) {
                    // Not extended by this empty claim: rows held back behind a waiting row of
                    // their key make the watch wake the lane for nothing, but only until then.
                    if linger_wait(&shared, &lease, until, &stop).await {
                        return LaneExit::Stopped;
                    }
                    continue;
                }
                linger_until = None;
                if !idle {
                    // Ask writers for a wake-up, then look once more: a row committed before the
                    // flag was visible would otherwise wait for the next poll.
                    set_idle(&shared, &lease, true).await;
                    idle = true;
                    continue;
                }
                let woken = shared.wake[lease.lane as usize].notified();
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(shared.cfg.poll_interval) => {}
                    _ = stop.cancelled() => return LaneExit::Stopped,
                }
                continue;
            }
            if lingers {
                linger_until = Some(Instant::now() + shared.cfg.linger);
            }
            if idle && (full || lingers) {
                // Under load the lane is busy: writers stop paying for NOTIFY.
                set_idle(&shared, &lease, false).await;
                idle = false;
            }
            let claim_ahead = match shared.cfg.claim_ahead {
                ClaimAhead::Always => true,
                ClaimAhead::Never => false,
                ClaimAhead::Auto => publish_took > claim_took,
            };
            // With claim ahead, the next batch is claimed while this one is published. Rows of a
            // key that this batch leaves unsettled (retry, park) are dropped from it: they stay
            // pending and are claimed again, in order, after the row that holds them back.
            if let Some(rate) = &shared.rate {
                if pace(rate, rows.len(), &stop).await {
                    return LaneExit::Stopped;
                }
            }
            let publish = publish_batch(&shared, &lease, &rows, &stop);
            let (done, next) = if claim_ahead {
                let in_flight: Vec<i64> = rows.iter().map(|r| r.pos).collect();
                let claim = timed(shared.counted(shared.store.claim(&lease, shared.cfg.batch_size, &in_flight)));
                let (done, next) = tokio::join!(publish, claim);
                (done, Some(next))
            } else {
                (publish.await, None)
            };
            let done = match done {
                Ok(done) => done,
                Err(exit) => return exit,
            };
            if let (Some(pace), Some(paced)) = (&shared.adaptive, turn.1.as_mut()) {
                // Below one lane's worth, the working lane rests in proportion before its next
                // turn, holding it (but no longer counted as a round under way).
                paced.resting();
                let rest = pace.pause_after(round_started.elapsed());
                if !rest.is_zero() && pause(&stop, rest).await {
                    return LaneExit::Stopped;
                }
            }
            drop(turn);
            publish_took = done.publish_took;
            if back_off(&shared.backoff, &stop, done.unavailable, &mut outages).await {
                return LaneExit::Stopped;
            }
            match next {
                Some((Ok(mut next), took)) => {
                    claim_took = took;
                    next.retain(|r| !r.key.as_deref().is_some_and(|k| done.blocked.contains(k)));
                    ahead = Some(next);
                }
                // The next round claims again, with the usual error handling.
                Some((Err(e), _)) => tracing::debug!(error = %e, "claim ahead failed"),
                // A short batch means the lane was drained a moment ago: a lingering lane waits
                // for the watch (it finds rows committed meanwhile) instead of claiming nothing
                // once more; otherwise yield instead of spinning.
                None if !full => match linger_until {
                    Some(until) => {
                        if linger_wait(&shared, &lease, until, &stop).await {
                            return LaneExit::Stopped;
                        }
                    }
                    None => tokio::task::yield_now().await,
                },
                None => {}
            }
        }
    }
    .instrument(span)
    .await
}

/// Waits, watched (see [`crate::linger`]), until the lane is woken or `until`; true when stopped.
async fn linger_wait<S: Store, P: Publisher>(
    shared: &Shared<S, P>,
    lease: &Lease,
    until: Instant,
    stop: &CancellationToken,
) -> bool {
    shared.watched.add(lease.lane);
    let woken = shared.wake[lease.lane as usize].notified();
    let stopped = tokio::select! {
        _ = woken => false,
        _ = tokio::time::sleep_until(until.into()) => false,
        _ = stop.cancelled() => true,
    };
    shared.watched.remove(lease.lane);
    stopped
}

/// Records the lane's idle flag. A failure only costs wake-up latency (the poll still runs), so it
/// is logged, not fatal.
async fn set_idle<S: Store, P>(shared: &Shared<S, P>, lease: &Lease, idle: bool) {
    let Some(wakeups) = shared.store.wakeups() else {
        return;
    };
    if let Err(e) = shared.counted(wakeups.set_idle(lease, idle)).await {
        tracing::debug!(error = %e, idle, "could not record the lane's idle flag");
    }
}

/// After a round in which the broker was unavailable, waits (growing with each such round in a
/// row) before the lane tries again; true when stopped meanwhile.
async fn back_off(backoff: &Backoff, stop: &CancellationToken, unavailable: bool, outages: &mut u32) -> bool {
    if !unavailable {
        *outages = 0;
        return false;
    }
    *outages += 1;
    pause(stop, backoff.delay(*outages)).await
}

/// Waits until the relay's pace allows the `n` messages of a batch, all at once, so that lanes take
/// turns batch by batch (asked piecemeal, 32 lanes would share the rate and every batch would wait
/// for the slowest share). A batch larger than the limiter's burst (one second's worth) goes message
/// by message. True when stopped meanwhile.
async fn pace(rate: &governor::DefaultDirectRateLimiter, n: usize, stop: &CancellationToken) -> bool {
    let Some(want) = std::num::NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
        return false;
    };
    let ready = async {
        if rate.until_n_ready(want).await.is_err() {
            for _ in 0..want.get() {
                rate.until_ready().await;
            }
        }
    };
    tokio::select! {
        _ = ready => false,
        _ = stop.cancelled() => true,
    }
}

/// Runs `f` and says how long it took.
pub(crate) async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = std::time::Instant::now();
    let out = f.await;
    (out, start.elapsed())
}
/// Sleeps `d` unless stopped first; true when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}
