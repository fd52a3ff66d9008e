//! The policy every consumer runner follows after one try of the inbox (Kafka, RabbitMQ and NATS
//! alike): what is done, what waits for the database, what is retried, what is dead-lettered; and the
//! counters the runners share. Each adapter keeps only what its broker does about it (commit an
//! offset, ack, nak with a delay, seek, publish a dead letter).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use uuid::Uuid;

use crate::{InboxError, Outcome};

/// Running counts of what a consumer runner did, readable while it runs.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RunnerStats {
    /// Messages whose handler ran and committed.
    pub processed: AtomicU64,
    /// Messages the inbox recognised as already processed.
    pub duplicates: AtomicU64,
    /// Messages parked until their predecessor is applied ([`crate::GapPolicy::Hold`]).
    pub parked: AtomicU64,
    /// Handler failures that were retried.
    pub retries: AtomicU64,
    /// Messages sent to the dead-letter destination.
    pub dead_lettered: AtomicU64,
    /// Tries that failed because of the database (or the dead-letter destination), not the
    /// message: waited out, never counted against the message.
    pub infrastructure_retries: AtomicU64,
    /// Connections re-opened after the broker was lost, by runners that reconnect themselves
    /// (RabbitMQ; librdkafka and async-nats reconnect inside their clients and leave it at 0).
    pub reconnects: AtomicU64,
}

/// What a runner does with a message after one try of [`crate::Inbox::process`]. Exhaustive on
/// purpose: a new decision must be handled by every runner, so adding one breaks their build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Processed, a duplicate or parked: acknowledge it (commit its offset).
    Done,
    /// The database failed, not the message: keep it, wait (longer with each such try in a row, the
    /// runner's outage streak) and try again, however long it takes. Never dead-lettered; the
    /// message's attempts stay as they were.
    WaitForDatabase,
    /// The handler failed with a retryable error: try again after the backoff of `attempt`, the
    /// number of handler failures so far.
    Retry {
        /// Handler failures so far, this one included.
        attempt: u32,
    },
    /// Give up: the error cannot be retried, or the message failed `attempts` times, as many as
    /// the runner allows. Dead-letter it, then acknowledge it.
    DeadLetter {
        /// Handler failures, this one included.
        attempts: u32,
    },
}

impl Disposition {
    /// Decides what to do with message `id` after a try that returned `res`, the handler having
    /// failed `failed_before` times already, and counts it in `stats` (dead letters are counted by
    /// the runner once written). Logs the decision with the message id.
    pub fn of<E: std::fmt::Display>(
        res: &Result<Outcome, InboxError<E>>,
        failed_before: u32,
        max_attempts: u32,
        stats: &RunnerStats,
        id: Uuid,
    ) -> Disposition {
        match res {
            Ok(outcome) => {
                let counter = match outcome {
                    Outcome::Duplicate => &stats.duplicates,
                    Outcome::Parked => &stats.parked,
                    Outcome::Processed => &stats.processed,
                };
                counter.fetch_add(1, Relaxed);
                Disposition::Done
            }
            Err(e) if e.is_infrastructure() => {
                stats.infrastructure_retries.fetch_add(1, Relaxed);
                metrics::counter!("outbox_consumer_infrastructure_errors_total").increment(1);
                tracing::warn!(outbox.id = %id, error = %e, "database unavailable; the message waits and is retried");
                Disposition::WaitForDatabase
            }
            Err(e) if e.is_retryable() && failed_before + 1 < max_attempts => {
                stats.retries.fetch_add(1, Relaxed);
                tracing::warn!(outbox.id = %id, attempt = failed_before + 1, error = %e, "handler failed; retrying");
                Disposition::Retry {
                    attempt: failed_before + 1,
                }
            }
            Err(e) => {
                tracing::error!(outbox.id = %id, attempt = failed_before + 1, error = %e, "giving up; dead-lettering");
                Disposition::DeadLetter {
                    attempts: failed_before + 1,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler_error() -> InboxError<String> {
        InboxError::Handler("boom".into())
    }

    #[test]
    fn outcomes_are_done_and_counted() {
        let stats = RunnerStats::default();
        for o in [
            Outcome::Processed,
            Outcome::Duplicate,
            Outcome::Parked,
            Outcome::Processed,
        ] {
            let res: Result<Outcome, InboxError> = Ok(o);
            assert_eq!(Disposition::of(&res, 3, 5, &stats, Uuid::nil()), Disposition::Done);
        }
        assert_eq!(stats.processed.load(Relaxed), 2);
        assert_eq!(stats.duplicates.load(Relaxed), 1);
        assert_eq!(stats.parked.load(Relaxed), 1);
    }

    #[test]
    fn database_trouble_waits_whatever_the_attempts() {
        let stats = RunnerStats::default();
        let err: Result<Outcome, InboxError> = Err(InboxError::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(
            Disposition::of(&err, 99, 5, &stats, Uuid::nil()),
            Disposition::WaitForDatabase
        );
        assert_eq!(stats.infrastructure_retries.load(Relaxed), 1);
        assert_eq!(stats.retries.load(Relaxed), 0);
    }

    #[test]
    fn handler_errors_retry_until_the_last_attempt_then_dead_letter() {
        let stats = RunnerStats::default();
        let err: Result<Outcome, _> = Err(handler_error());
        assert_eq!(
            Disposition::of(&err, 0, 3, &stats, Uuid::nil()),
            Disposition::Retry { attempt: 1 }
        );
        assert_eq!(
            Disposition::of(&err, 1, 3, &stats, Uuid::nil()),
            Disposition::Retry { attempt: 2 }
        );
        assert_eq!(
            Disposition::of(&err, 2, 3, &stats, Uuid::nil()),
            Disposition::DeadLetter { attempts: 3 }
        );
        assert_eq!(stats.retries.load(Relaxed), 2);
        let missing: Result<Outcome, InboxError> = Err(InboxError::MissingHeader("outbox-id"));
        assert_eq!(
            Disposition::of(&missing, 0, 3, &stats, Uuid::nil()),
            Disposition::DeadLetter { attempts: 1 },
            "nothing can fix a message without its id"
        );
    }
}
