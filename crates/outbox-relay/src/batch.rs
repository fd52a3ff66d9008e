//! One batch of a lane: publishing it, and settling each row by the broker's answer (marked
//! published, retried, dead-lettered or left for later), keeping per-key order.

use std::collections::HashSet;
use std::time::Duration;

use outbox::{Delivered, Error, FailureKind, Lease, PublishError, Publisher, Store, StoredMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{DeadLetterPolicy, RelayConfig};
use crate::lane::{timed, LaneExit};
use crate::shared::Shared;

/// What settling a batch leaves for the next round.
pub(crate) struct BatchDone {
    /// Keys with a row left unsettled (retried or parked): nothing later of theirs may be sent.
    pub(crate) blocked: HashSet<String>,
    /// How long the broker took (the publish alone, without the marks).
    pub(crate) publish_took: Duration,
    /// The broker could not be used: back off before the next round.
    pub(crate) unavailable: bool,
    /// Rows of the batch stay pending without a delay (held back behind a failed row of their key,
    /// or not sent: the broker unavailable): the lane claims again rather than wait for a wake-up.
    pub(crate) left_pending: bool,
    /// The delays of the rows it backed off: the lane looks again when they end.
    pub(crate) retry_in: Vec<Duration>,
}

/// A batch the broker has answered, waiting for its marks.
pub(crate) struct Sent {
    pub(crate) rows: Vec<StoredMessage>,
    pub(crate) results: Vec<Result<Delivered, PublishError>>,
    /// How long the broker took.
    pub(crate) publish_took: Duration,
}

/// Publishes a claimed batch and waits for the broker's answer to every row.
pub(crate) async fn send<S: Store, P: Publisher>(shared: &Shared<S, P>, lane: i32, rows: Vec<StoredMessage>) -> Sent {
    crate::failpoint::hit(crate::failpoint::Point::AfterClaim);
    let span = tracing::debug_span!("publish_batch", lane, size = rows.len());
    crate::failpoint::hit(crate::failpoint::Point::DuringPublish);
    let (results, publish_took) = timed(publish_decodable(shared, &rows).instrument(span)).await;
    shared.meters.batch_duration.record(publish_took.as_secs_f64());
    let results = fitted(&rows, results);
    Sent {
        rows,
        results,
        publish_took,
    }
}

/// Settles every row of a sent batch by the broker's answer: marks the delivered ones, backs off
/// the failed ones, dead-letters the hopeless ones. `give_up` gives up the lane's turns (busy
/// lanes, adaptive pace) when a store write fails, so other lanes work while this one retries.
pub(crate) async fn settle_sent<S: Store, P: Publisher>(
    shared: &Shared<S, P>,
    lease: &Lease,
    sent: Sent,
    give_up: &mut (dyn FnMut() + Send),
    stop: &CancellationToken,
) -> Result<BatchDone, LaneExit> {
    crate::failpoint::hit(crate::failpoint::Point::BeforeMark);
    let Sent {
        rows,
        results,
        publish_took,
    } = sent;
    let rows = &rows[..];
    let plan = settle(&shared.cfg, rows, results);
    let now = chrono::Utc::now();
    // Confirmed rows first: a crash after this point re-sends only the failed ones.
    if !plan.delivered.is_empty() {
        crate::failpoint::hit(crate::failpoint::Point::DuringMark);
        retry_store(stop, shared, lease, give_up, || {
            shared.store.mark_published(lease, &plan.delivered)
        })
        .await?;
        crate::failpoint::hit(crate::failpoint::Point::AfterMark);
        shared.meters.published.increment(plan.delivered.len() as u64);
        shared.health.add_published(plan.delivered.len());
        for created in &plan.delivered_created {
            let age = (now - *created).to_std().unwrap_or_default();
            shared.meters.publish_latency.record(age.as_secs_f64());
        }
    }
    let mut retry_in = Vec::with_capacity(plan.retry.len());
    for (row, err) in &plan.retry {
        let attempt = row.attempts + 1;
        let delay = shared.backoff.delay(attempt.max(1) as u32);
        retry_in.push(delay);
        tracing::warn!(outbox.id = %row.id, attempt, error = %err, retry_in = ?delay, "publish failed; will retry");
        shared.meters.failed_retryable.increment(1);
        shared.meters.retried.increment(1);
        retry_store(stop, shared, lease, give_up, || {
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
        retry_store(stop, shared, lease, give_up, || {
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
        left_pending: plan.delivered.len() + plan.dead.len() + plan.retry.len() < rows.len(),
        retry_in,
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
    let mut sent = fitted(&send, shared.publisher.publish(&send).await).into_iter();
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| sent.next().expect("fitted answers every row sent")))
        .collect()
}

/// The publisher's answers fitted to `rows`, one each, in order. A publisher must answer once per
/// row, for that row; one that does not has a bug, logged here: a row it gave no answer for, or an
/// answer for another row's position, fails as retryable (sent again), the rows answered are
/// settled as answered, and extra answers are dropped. (An assertion panicked the lane instead, and
/// the lane's next run sent the whole batch again, the confirmed rows included.)
fn fitted(
    rows: &[StoredMessage],
    results: Vec<Result<Delivered, PublishError>>,
) -> Vec<Result<Delivered, PublishError>> {
    if results.len() != rows.len() {
        tracing::error!(
            rows = rows.len(),
            answers = results.len(),
            "the publisher did not answer once per row; the rows without an answer are sent again"
        );
    }
    let mut answers = results.into_iter();
    rows.iter()
        .map(|row| match answers.next() {
            Some(Ok(d)) if d.pos != row.pos => {
                tracing::error!(
                    pos = row.pos,
                    answered = d.pos,
                    "the publisher answered for another row"
                );
                Err(PublishError::retryable(format!(
                    "the publisher answered for position {} in place of {}",
                    d.pos, row.pos
                )))
            }
            Some(answer) => answer,
            None => Err(PublishError::retryable("the publisher gave no answer for this row")),
        })
        .collect()
}
/// Retries a store write on database trouble until it succeeds, the lease is gone, or the lane is
/// told to stop and a few more tries failed (the rows then stay pending and are re-sent later).
/// While it fails, the relay's health names the lane ([`crate::RelayHealth::store_failing`]) and
/// the lane's turns are given up (`give_up`).
async fn retry_store<S, P, F, Fut>(
    stop: &CancellationToken,
    shared: &Shared<S, P>,
    lease: &Lease,
    give_up: &mut (dyn FnMut() + Send),
    mut op: F,
) -> Result<(), LaneExit>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = outbox::Result<()>>,
{
    // However it ends (returned, or the lane's task dropped), the lane's failure is over.
    let _over = StoreSettled(&shared.health, lease.lane);
    let mut attempt: u32 = 0;
    loop {
        match shared.counted_write(op()).await {
            Ok(()) => return Ok(()),
            Err(Error::StaleLease { lane, epoch }) => {
                tracing::warn!(lane, epoch, "lease lost: another relay owns the lane now");
                return Err(LaneExit::Lost);
            }
            Err(e) => {
                attempt += 1;
                shared.meters.store_errors.increment(1);
                tracing::warn!(error = %e, attempt, "store write failed; retrying");
                shared.health.store_failed(lease.lane, e.to_string());
                // The lane is not working while it waits: under `max_busy_lanes` or the adaptive
                // pace its turns (this batch's, and those of the batches in flight after it,
                // whose marks wait for this one) would keep every other lane waiting as long as
                // this fails.
                give_up();
                if stop.is_cancelled() && attempt >= 3 {
                    return Err(LaneExit::Stopped);
                }
                tokio::time::sleep(shared.backoff.delay(attempt.min(6))).await;
            }
        }
    }
}

/// Clears a lane's store failure from the health when dropped.
struct StoreSettled<'a>(&'a crate::RelayHealth, i32);

impl Drop for StoreSettled<'_> {
    fn drop(&mut self) {
        self.0.store_settled(self.1);
    }
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
