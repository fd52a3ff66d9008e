//! One lane's loop: claim a batch, publish it, settle every row (mark published, back off, or
//! dead-letter), in per-key order. One batch in flight per lane.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Backoff, Delivered, Error, FailureKind, Lease, PublishError, Publisher, Store, StoredMessage};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{ClaimAhead, DeadLetterPolicy, RelayConfig};
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
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = std::time::Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// What settling a batch leaves for the next round.
struct BatchDone {
    /// Keys with a row left unsettled (retried or parked): nothing later of theirs may be sent.
    blocked: HashSet<String>,
    /// How long the broker took (the publish alone, without the marks).
    publish_took: Duration,
    /// The broker could not be used: back off before the next round.
    unavailable: bool,
}

/// Sleeps `d` unless stopped first; true when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}

async fn publish_batch<S: Store, P: Publisher>(
    shared: &Shared<S, P>,
    lease: &Lease,
    rows: &[StoredMessage],
    stop: &CancellationToken,
) -> Result<BatchDone, LaneExit> {
    crate::failpoint::hit(crate::failpoint::Point::AfterClaim);
    let span = tracing::debug_span!("publish_batch", lane = lease.lane, size = rows.len());
    crate::failpoint::hit(crate::failpoint::Point::DuringPublish);
    let (results, publish_took) = timed(publish_decodable(shared, rows).instrument(span)).await;
    shared.meters.batch_duration.record(publish_took.as_secs_f64());
    assert_eq!(results.len(), rows.len(), "publisher must answer once per message");
    crate::failpoint::hit(crate::failpoint::Point::BeforeMark);

    let plan = settle(&shared.cfg, rows, results);
    let now = chrono::Utc::now();
    // Confirmed rows first: a crash after this point re-sends only the failed ones.
    if !plan.delivered.is_empty() {
        crate::failpoint::hit(crate::failpoint::Point::DuringMark);
        retry_store(stop, shared, || shared.store.mark_published(lease, &plan.delivered)).await?;
        crate::failpoint::hit(crate::failpoint::Point::AfterMark);
        shared.meters.published.increment(plan.delivered.len() as u64);
        shared.health.add_published(plan.delivered.len());
        for created in &plan.delivered_created {
            let age = (now - *created).to_std().unwrap_or_default();
            shared.meters.publish_latency.record(age.as_secs_f64());
        }
    }
    for (row, err) in &plan.retry {
        let attempt = row.attempts + 1;
        let delay = shared.backoff.delay(attempt.max(1) as u32);
        tracing::warn!(outbox.id = %row.id, attempt, error = %err, retry_in = ?delay, "publish failed; will retry");
        shared.meters.failed_retryable.increment(1);
        shared.meters.retried.increment(1);
        retry_store(stop, shared, || {
            shared.store.mark_failed(lease, row.pos, &err.message, delay)
        })
        .await?;
    }
    for (row, err) in &plan.dead {
        let park = shared.cfg.dead_letter_policy == DeadLetterPolicy::Park;
        tracing::error!(outbox.id = %row.id, topic = %row.topic, key = ?row.key, attempts = row.attempts + 1,
            error = %err, park, "message dead-lettered");
        if err.kind == FailureKind::Permanent {
            shared.meters.failed_permanent.increment(1);
        }
        shared.meters.dead_lettered.increment(1);
        retry_store(stop, shared, || {
            shared.store.dead_letter(lease, row.pos, &err.message, park)
        })
        .await?;
    }
    shared
        .health
        .broker(plan.unavailable.is_none() || !plan.delivered.is_empty());
    if let Some(why) = &plan.unavailable {
        shared.meters.failed_unavailable.increment(1);
        tracing::error!(error = %why, "broker unavailable; the lane backs off, no attempt counted");
    }
    Ok(BatchDone {
        blocked: plan.blocked.into_iter().map(str::to_owned).collect(),
        publish_took,
        unavailable: plan.unavailable.is_some(),
    })
}

/// Publishes the batch, except rows that could not be decoded: those fail permanently (and are
/// dead-lettered by `settle`). Under `park`, the rest of a corrupt row's key is not sent either.
async fn publish_decodable<S: Store, P: Publisher>(
    shared: &Shared<S, P>,
    rows: &[StoredMessage],
) -> Vec<Result<Delivered, PublishError>> {
    if rows.iter().all(|r| r.corrupt.is_none()) {
        return shared.publisher.publish(rows).await;
    }
    let park = shared.cfg.dead_letter_policy == DeadLetterPolicy::Park;
    let mut results: Vec<Option<Result<Delivered, PublishError>>> = Vec::with_capacity(rows.len());
    let mut held: HashSet<&str> = HashSet::new();
    let mut send = Vec::new();
    for row in rows {
        let key_held = row.key.as_deref().is_some_and(|k| held.contains(k));
        if let Some(reason) = &row.corrupt {
            if park {
                held.extend(row.key.as_deref());
            }
            results.push(Some(Err(PublishError::permanent(reason.clone()))));
        } else if key_held {
            results.push(Some(Err(PublishError::held_back(
                "held back behind a parked corrupt row",
            ))));
        } else {
            results.push(None);
            send.push(row.clone());
        }
    }
    let mut sent = shared.publisher.publish(&send).await.into_iter();
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| sent.next().expect("publisher must answer once per message")))
        .collect()
}

/// What to do with each row of a batch, given the broker's answers.
#[derive(Debug, Default)]
pub(crate) struct Plan<'a> {
    pub(crate) delivered: Vec<Delivered>,
    /// `created_at` of each delivered row, for the latency histogram.
    pub(crate) delivered_created: Vec<chrono::DateTime<chrono::Utc>>,
    pub(crate) retry: Vec<(&'a StoredMessage, PublishError)>,
    pub(crate) dead: Vec<(&'a StoredMessage, PublishError)>,
    /// Why the broker could not be used, if it could not: those rows stay as they are (no
    /// attempt counted) and the lane backs off.
    pub(crate) unavailable: Option<String>,
    /// Keys with a row left unsettled (retried or parked): nothing later of theirs may be sent.
    pub(crate) blocked: HashSet<&'a str>,
}

/// Per key, once a message is not settled as delivered (it will be retried, or is parked), nothing
/// after it is marked: those rows stay pending untouched and are re-sent after it.
pub(crate) fn settle<'a>(
    cfg: &RelayConfig,
    rows: &'a [StoredMessage],
    results: Vec<Result<Delivered, PublishError>>,
) -> Plan<'a> {
    let mut plan = Plan::default();
    for (row, res) in rows.iter().zip(results) {
        if let Some(k) = row.key.as_deref() {
            if plan.blocked.contains(k) {
                continue;
            }
        }
        match res {
            Ok(d) => {
                plan.delivered.push(d);
                plan.delivered_created.push(row.created_at);
            }
            // Never sent: not an attempt. The row stays pending as it is, and so does the rest of
            // its key, until its predecessor is resolved.
            Err(e) if e.kind == FailureKind::HeldBack => {
                if let Some(k) = row.key.as_deref() {
                    plan.blocked.insert(k);
                }
            }
            Err(e) if e.kind == FailureKind::Unavailable => {
                if let Some(k) = row.key.as_deref() {
                    plan.blocked.insert(k);
                }
                plan.unavailable.get_or_insert(e.message);
            }
            Err(e) => {
                let exhausted = row.attempts + 1 >= cfg.max_attempts;
                let dead = e.kind == FailureKind::Permanent || exhausted;
                let blocks = !dead || cfg.dead_letter_policy == DeadLetterPolicy::Park;
                if blocks {
                    if let Some(k) = row.key.as_deref() {
                        plan.blocked.insert(k);
                    }
                }
                if dead {
                    let e = if exhausted && e.kind != FailureKind::Permanent {
                        PublishError::permanent(format!("gave up after {} attempts: {}", row.attempts + 1, e.message))
                    } else {
                        e
                    };
                    plan.dead.push((row, e));
                } else {
                    plan.retry.push((row, e));
                }
            }
        }
    }
    plan
}

/// Retries a store write on database trouble until it succeeds, the lease is gone, or the lane is
/// told to stop and a few more tries failed (the rows then stay pending and are re-sent later).
async fn retry_store<S, P, F, Fut>(stop: &CancellationToken, shared: &Shared<S, P>, mut op: F) -> Result<(), LaneExit>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = outbox::Result<()>>,
{
    let mut attempt: u32 = 0;
    loop {
        match shared.counted(op()).await {
            Ok(()) => return Ok(()),
            Err(Error::StaleLease { lane, epoch }) => {
                tracing::warn!(lane, epoch, "lease lost: another relay owns the lane now");
                return Err(LaneExit::Lost);
            }
            Err(e) => {
                attempt += 1;
                shared.meters.store_errors.increment(1);
                tracing::warn!(error = %e, attempt, "store write failed; retrying");
                if stop.is_cancelled() && attempt >= 3 {
                    return Err(LaneExit::Stopped);
                }
                tokio::time::sleep(shared.backoff.delay(attempt.min(6))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pos: i64, key: Option<&str>, attempts: i32) -> StoredMessage {
        let row = StoredMessage::new(pos, uuid::Uuid::now_v7(), 0, "t", vec![])
            .attempts(attempts)
            .created_at(chrono::Utc::now());
        match key {
            Some(k) => row.key(k, pos),
            None => row,
        }
    }

    fn ok(pos: i64) -> Result<Delivered, PublishError> {
        Ok(Delivered::new(pos).at(0, pos))
    }

    #[test]
    fn a_retryable_failure_holds_the_rest_of_its_key_only() {
        let rows = [
            row(1, Some("a"), 0),
            row(2, Some("b"), 0),
            row(3, Some("a"), 0),
            row(4, None, 0),
            row(5, Some("b"), 0),
        ];
        let results = vec![ok(1), Err(PublishError::retryable("down")), ok(3), ok(4), ok(5)];
        let plan = settle(&RelayConfig::default(), &rows, results);
        let marked: Vec<i64> = plan.delivered.iter().map(|d| d.pos).collect();
        assert_eq!(
            marked,
            vec![1, 3, 4],
            "b's later row 5 must wait for row 2 even though it was delivered"
        );
        assert_eq!(plan.retry.len(), 1);
        assert_eq!(plan.retry[0].0.pos, 2);
        assert!(plan.dead.is_empty());
    }

    #[test]
    fn permanent_failures_dead_letter_and_skip_or_park_the_key() {
        let rows = [row(1, Some("a"), 0), row(2, Some("a"), 0)];
        let results = || vec![Err(PublishError::permanent("too large")), ok(2)];
        let skip = settle(&RelayConfig::default(), &rows, results());
        assert_eq!(skip.dead.len(), 1);
        assert_eq!(skip.delivered.iter().map(|d| d.pos).collect::<Vec<_>>(), vec![2]);
        let park = settle(
            &RelayConfig::default().dead_letter_policy(DeadLetterPolicy::Park),
            &rows,
            results(),
        );
        assert_eq!(park.dead.len(), 1);
        assert!(
            park.delivered.is_empty(),
            "a parked key publishes nothing after its dead letter"
        );
    }

    #[test]
    fn an_unavailable_broker_counts_no_attempt_and_holds_the_key() {
        let rows = [row(1, Some("a"), 19), row(2, Some("a"), 0), row(3, Some("b"), 0)];
        let results = vec![
            Err(PublishError::unavailable("SASL authentication failed")),
            ok(2),
            ok(3),
        ];
        let plan = settle(&RelayConfig::default(), &rows, results);
        assert!(
            plan.retry.is_empty() && plan.dead.is_empty(),
            "no attempt counted, never dead-lettered"
        );
        assert_eq!(plan.delivered.iter().map(|d| d.pos).collect::<Vec<_>>(), vec![3]);
        assert!(plan.blocked.contains("a"));
        assert_eq!(plan.unavailable.as_deref(), Some("SASL authentication failed"));
    }

    #[test]
    fn exhausted_attempts_dead_letter_with_the_reason() {
        let rows = [row(1, Some("a"), 4)];
        let plan = settle(
            &RelayConfig::default().max_attempts(5),
            &rows,
            vec![Err(PublishError::retryable("timeout"))],
        );
        assert!(plan.retry.is_empty());
        assert_eq!(plan.dead.len(), 1);
        assert!(
            plan.dead[0].1.message.contains("gave up after 5 attempts"),
            "{}",
            plan.dead[0].1.message
        );
    }
}
