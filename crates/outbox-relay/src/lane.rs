//! One lane's loop: claim a batch, publish it, settle every row (mark published, back off, or
//! dead-letter), in per-key order. One batch in flight per lane.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use outbox::{Delivered, Error, FailureKind, Lease, PublishError, Publisher, Store, StoredMessage};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{DeadLetterPolicy, RelayConfig};
use crate::metrics as m;

pub(crate) struct Shared<S, P> {
    pub(crate) store: S,
    pub(crate) publisher: P,
    pub(crate) cfg: RelayConfig,
    /// One wake-up per lane (NOTIFY payload or in-process commit).
    pub(crate) wake: Vec<Notify>,
}

/// Why a lane loop ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LaneExit {
    /// Asked to stop (shutdown or rebalance); the lease is still ours.
    Stopped,
    /// Another relay took the lane over.
    Lost,
}

pub(crate) async fn run_lane<S: Store, P: Publisher>(
    shared: Arc<Shared<S, P>>,
    lease: Lease,
    stop: CancellationToken,
) -> LaneExit {
    let span = tracing::info_span!("lane", lane = lease.lane, epoch = lease.epoch);
    async move {
        tracing::debug!("lane started");
        let mut store_errors = 0;
        loop {
            if stop.is_cancelled() {
                return LaneExit::Stopped;
            }
            let rows = match shared.store.claim(&lease, shared.cfg.batch_size).await {
                Ok(rows) => {
                    store_errors = 0;
                    rows
                }
                Err(e) => {
                    store_errors += 1;
                    metrics::counter!(m::STORE_ERRORS).increment(1);
                    tracing::warn!(error = %e, "claim failed; retrying");
                    if pause(&stop, shared.cfg.backoff(store_errors)).await {
                        return LaneExit::Stopped;
                    }
                    continue;
                }
            };
            if rows.is_empty() {
                let woken = shared.wake[lease.lane as usize].notified();
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(shared.cfg.poll_interval) => {}
                    _ = stop.cancelled() => return LaneExit::Stopped,
                }
                continue;
            }
            let full = rows.len() == shared.cfg.batch_size;
            if let Err(LaneExit::Lost) = publish_batch(&shared, &lease, &rows, &stop).await {
                return LaneExit::Lost;
            }
            if !full {
                // A short batch means the lane was drained a moment ago; yield instead of spinning.
                tokio::task::yield_now().await;
            }
        }
    }
    .instrument(span)
    .await
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
) -> Result<(), LaneExit> {
    let span = tracing::debug_span!("publish_batch", lane = lease.lane, size = rows.len());
    let started = std::time::Instant::now();
    let results = shared.publisher.publish(rows).instrument(span).await;
    metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    assert_eq!(results.len(), rows.len(), "publisher must answer once per message");

    let plan = settle(&shared.cfg, rows, results);
    let now = chrono::Utc::now();
    // Confirmed rows first: a crash after this point re-sends only the failed ones.
    if !plan.delivered.is_empty() {
        retry_store(stop, &shared.cfg, || shared.store.mark_published(lease, &plan.delivered)).await?;
        metrics::counter!(m::PUBLISHED).increment(plan.delivered.len() as u64);
        for created in &plan.delivered_created {
            let age = (now - *created).to_std().unwrap_or_default();
            metrics::histogram!(m::PUBLISH_LATENCY).record(age.as_secs_f64());
        }
    }
    for (row, err) in &plan.retry {
        let attempt = row.attempts + 1;
        let delay = shared.cfg.backoff(attempt);
        tracing::warn!(outbox.id = %row.id, attempt, error = %err, retry_in = ?delay, "publish failed; will retry");
        metrics::counter!(m::FAILED, "kind" => "retryable").increment(1);
        metrics::counter!(m::RETRIED).increment(1);
        retry_store(stop, &shared.cfg, || shared.store.mark_failed(lease, row.pos, &err.message, delay)).await?;
    }
    for (row, err) in &plan.dead {
        let park = shared.cfg.dead_letter_policy == DeadLetterPolicy::Park;
        tracing::error!(outbox.id = %row.id, topic = %row.topic, key = ?row.key, attempts = row.attempts + 1,
            error = %err, park, "message dead-lettered");
        if err.kind == FailureKind::Permanent {
            metrics::counter!(m::FAILED, "kind" => "permanent").increment(1);
        }
        metrics::counter!(m::DEAD_LETTERED).increment(1);
        retry_store(stop, &shared.cfg, || shared.store.dead_letter(lease, row.pos, &err.message, park)).await?;
    }
    Ok(())
}

/// What to do with each row of a batch, given the broker's answers.
#[derive(Debug, Default)]
pub(crate) struct Plan<'a> {
    pub(crate) delivered: Vec<Delivered>,
    /// `created_at` of each delivered row, for the latency histogram.
    pub(crate) delivered_created: Vec<chrono::DateTime<chrono::Utc>>,
    pub(crate) retry: Vec<(&'a StoredMessage, PublishError)>,
    pub(crate) dead: Vec<(&'a StoredMessage, PublishError)>,
}

/// Per key, once a message is not settled as delivered (it will be retried, or is parked), nothing
/// after it is marked: those rows stay pending untouched and are re-sent after it.
pub(crate) fn settle<'a>(
    cfg: &RelayConfig,
    rows: &'a [StoredMessage],
    results: Vec<Result<Delivered, PublishError>>,
) -> Plan<'a> {
    let mut plan = Plan::default();
    let mut blocked: HashSet<&str> = HashSet::new();
    for (row, res) in rows.iter().zip(results) {
        if let Some(k) = row.key.as_deref() {
            if blocked.contains(k) {
                continue;
            }
        }
        match res {
            Ok(d) => {
                plan.delivered.push(d);
                plan.delivered_created.push(row.created_at);
            }
            Err(e) => {
                let exhausted = row.attempts + 1 >= cfg.max_attempts;
                let dead = e.kind == FailureKind::Permanent || exhausted;
                let blocks = !dead || cfg.dead_letter_policy == DeadLetterPolicy::Park;
                if blocks {
                    if let Some(k) = row.key.as_deref() {
                        blocked.insert(k);
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
async fn retry_store<F, Fut>(stop: &CancellationToken, cfg: &RelayConfig, mut op: F) -> Result<(), LaneExit>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = outbox::Result<()>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(()) => return Ok(()),
            Err(Error::StaleLease { lane, epoch }) => {
                tracing::warn!(lane, epoch, "lease lost: another relay owns the lane now");
                return Err(LaneExit::Lost);
            }
            Err(e) => {
                attempt += 1;
                metrics::counter!(m::STORE_ERRORS).increment(1);
                tracing::warn!(error = %e, attempt, "store write failed; retrying");
                if stop.is_cancelled() && attempt >= 3 {
                    return Err(LaneExit::Stopped);
                }
                tokio::time::sleep(cfg.backoff(attempt.min(6))).await;
            }
        }
    }
}
