//! The policy every consumer runner follows after one try of the inbox (Kafka, RabbitMQ and NATS
//! alike): what is done, what waits for the database, what is retried, what is dead-lettered; and the
//! counters the runners share. [`RunnerCore`] makes the try itself the same way for every broker:
//! the delivery's headers parsed into an [`Incoming`], the inbox run inside the broker's span, the
//! outcome decided. Each adapter keeps only what its broker does about it (commit an offset, ack,
//! nak with a delay, seek, publish a dead letter). [`CleanupSchedule`] times the deletion of the
//! inbox's expired records the same way for every runner.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use outbox::Backoff;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use crate::{Backend, Handler, Inbox, InboxError, Incoming, Outcome};

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

/// What one try of a delivery came to ([`RunnerCore::try_once`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tried {
    /// The outbox headers are missing or unusable: no handler ran and no retry can help. Dead-letter
    /// it at once; `error` says why.
    Unreadable {
        /// Why the headers were refused.
        error: String,
    },
    /// The inbox was tried: do as `disposition` says.
    Decided {
        /// The message id.
        id: Uuid,
        /// What to do with the message.
        disposition: Disposition,
        /// What failed, for a dead letter; empty when the try succeeded.
        error: String,
        /// When what failed is a parked message the delivered one brought along (under
        /// [`crate::GapPolicy::Hold`]; the delivered message is applied): that message, the one
        /// to dead-letter.
        parked: Option<ParkedFailure>,
    },
}

/// A parked message that failed after the message delivered with it was applied
/// ([`InboxError::parked`]): what finds it in the inbox's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedFailure {
    /// Its `outbox-source` (`None`: none), as the delivered message's.
    pub source: Option<String>,
    /// Its key, the delivered message's.
    pub key: String,
    /// Its seq.
    pub seq: i64,
    /// Its `outbox-id`.
    pub id: Uuid,
}

/// What a runner that retries a message in place does next (Kafka pauses the message's partition,
/// RabbitMQ holds its queue): see [`RunnerCore::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Applied, a duplicate, parked or dead-lettered: acknowledge it (store its offset).
    Done,
    /// Try again after `delay`.
    Again {
        /// Handler failures so far.
        attempts: u32,
        /// How long the message waits.
        delay: Duration,
    },
}

/// How a runner that retries a message in place spaces its tries.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RetryInPlace {
    /// The delay after `n` failures in a row, of the handler or of the database (the runner's
    /// outage streak); its cap is the wait before a dead letter that could not be written is tried
    /// again.
    pub backoff: Backoff,
    /// What waits meanwhile, as the log names it (`"the partition"`, `"the queue"`).
    pub waiting: &'static str,
}

impl RetryInPlace {
    /// Delays from `backoff`; `waiting` names what waits, in the log.
    pub fn new(backoff: Backoff, waiting: &'static str) -> Self {
        RetryInPlace { backoff, waiting }
    }
}

/// What every consumer runner holds and does alike, whatever its broker: the database pool, the
/// inbox, the handler and the counters; one try of a delivery; the database's outage streak; the
/// counting of dead letters.
pub struct RunnerCore<DB: Backend, H> {
    pool: sqlx::Pool<DB>,
    inbox: Inbox,
    handler: H,
    stats: Arc<RunnerStats>,
    /// Database failures in a row (any message): the backoff while the database is away.
    outage_streak: AtomicU32,
}

impl<DB: Backend, H: Handler<DB>> RunnerCore<DB, H> {
    /// Messages go through `inbox` on `pool`, applied by `handler`.
    pub fn new(pool: sqlx::Pool<DB>, inbox: Inbox, handler: H) -> Self {
        RunnerCore {
            pool,
            inbox,
            handler,
            stats: Arc::default(),
            outage_streak: AtomicU32::new(0),
        }
    }

    /// The database pool.
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }

    /// The inbox.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<RunnerStats> {
        &self.stats
    }

    /// One try of a delivery: parses `topic`, `payload` and `headers` (as
    /// [`Incoming::from_headers`]), runs the message through the inbox inside the span `span`
    /// makes (given the message and its `traceparent` header, if any), and decides with
    /// [`Disposition::of`], the handler having failed `failed_before` times already.
    pub async fn try_once<'a>(
        &self,
        topic: &'a str,
        payload: &'a [u8],
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        failed_before: u32,
        max_attempts: u32,
        span: impl FnOnce(&Incoming<'a>, Option<&str>) -> tracing::Span,
    ) -> Tried {
        let incoming = match Incoming::from_headers(topic, payload, headers) {
            Ok(i) => i,
            Err(e) => return Tried::Unreadable { error: e.to_string() },
        };
        let traceparent = incoming
            .header_value(outbox::HEADER_TRACEPARENT)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let span = span(&incoming, traceparent.as_deref());
        let res = self
            .inbox
            .process(&self.pool, &incoming, &self.handler)
            .instrument(span)
            .await;
        let parked = match (&res, incoming.key) {
            (Err(e), Some(key)) => e.parked().map(|(id, seq)| ParkedFailure {
                source: incoming.source.map(str::to_owned),
                key: key.to_owned(),
                seq,
                id,
            }),
            _ => None,
        };
        Tried::Decided {
            id: incoming.id,
            disposition: Disposition::of(&res, failed_before, max_attempts, &self.stats, incoming.id),
            error: res.err().map(|e| e.to_string()).unwrap_or_default(),
            parked,
        }
    }

    /// Dead-letters the parked message `failed` names, which failed every try: in one transaction
    /// on the key's row, takes it out of the inbox's tables, hands it to `dead_letter` and, once
    /// that succeeded, commits. Its key then waits for it as for any message dead-lettered under
    /// [`crate::GapPolicy::Hold`]: a replay of the dead letter applies it and its successors,
    /// [`Inbox::release_parked`] goes past it. True when it was dead-lettered; false when it is
    /// no longer parked (applied or dead-lettered meanwhile). On an error nothing changed: it
    /// stays parked, and a dead letter may have been written (it is written again next time).
    pub async fn dead_letter_parked<F, Fut, E>(&self, failed: &ParkedFailure, dead_letter: F) -> Result<bool, String>
    where
        F: FnOnce(crate::Parked) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let consumer = self.inbox.consumer();
        let (source, key) = (failed.source.as_deref().unwrap_or(""), failed.key.as_str());
        let database = |e: sqlx::Error| format!("database error: {e}");
        let mut tx = self.pool.begin().await.map_err(database)?;
        DB::lock_key(&mut *tx, consumer, source, key).await.map_err(database)?;
        let parked = DB::take_parked(&mut *tx, consumer, source, key, failed.seq)
            .await
            .map_err(database)?;
        // Dropping `tx` rolls it back: nothing taken.
        let Some(parked) = parked.filter(|p| p.id == failed.id) else {
            return Ok(false);
        };
        dead_letter(parked).await.map_err(|e| e.to_string())?;
        tx.commit().await.map_err(database)?;
        tracing::warn!(key, seq = failed.seq, outbox.id = %failed.id, "parked message dead-lettered; its key waits for it (replay it, or release the key's parked messages)");
        Ok(true)
    }

    /// For a runner that retries a message in place: the step after `tried`, the handler having
    /// failed `failed_before` times before it. The database waits by the outage streak, however
    /// long it lasts; the handler's failures by their own count. A message to dead-letter is
    /// handed to `dead_letter` (the error, the handler failures, and the parked message to
    /// dead-letter instead of the delivered one, see [`RunnerCore::dead_letter_parked`]); if that
    /// fails, the message waits the backoff's cap and is tried again rather than skipped.
    pub async fn step<F, Fut, E>(&self, tried: Tried, failed_before: u32, retry: &RetryInPlace, dead_letter: F) -> Step
    where
        F: FnOnce(String, u32, Option<crate::Parked>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let (error, attempts, parked) = match tried {
            Tried::Unreadable { error } => (error, 0, None),
            Tried::Decided {
                disposition,
                error,
                parked,
                ..
            } => match disposition {
                Disposition::Done => {
                    self.outage_streak.store(0, Relaxed);
                    return Step::Done;
                }
                Disposition::WaitForDatabase => {
                    // The database, not the message: it waits for as long as it takes.
                    let streak = self.outage_streak.fetch_add(1, Relaxed) + 1;
                    return Step::Again {
                        attempts: failed_before,
                        delay: retry.backoff.delay(streak),
                    };
                }
                Disposition::Retry { attempt } => {
                    return Step::Again {
                        attempts: attempt,
                        delay: retry.backoff.delay(attempt),
                    }
                }
                Disposition::DeadLetter { attempts } => (error, attempts, parked),
            },
        };
        let written = match parked {
            None => dead_letter(error, attempts, None)
                .await
                .map(|()| true)
                .map_err(|e| e.to_string()),
            Some(failed) => {
                self.dead_letter_parked(&failed, |p| dead_letter(error, attempts, Some(p)))
                    .await
            }
        };
        match written {
            Ok(written) => {
                if written {
                    self.dead_lettered();
                }
                Step::Done
            }
            Err(e) => {
                self.stats.infrastructure_retries.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "dead letter not written; {} waits and retries", retry.waiting);
                Step::Again {
                    attempts: attempts.saturating_sub(1),
                    delay: retry.backoff.max(),
                }
            }
        }
    }

    /// Counts a dead letter written.
    pub fn dead_lettered(&self) {
        metrics::counter!("outbox_consumer_dead_lettered_total").increment(1);
        self.stats.dead_lettered.fetch_add(1, Relaxed);
    }

    /// Deletes the inbox's expired records ([`Inbox::cleanup`], in batches of 1000), logs how it
    /// went (a failure is tried again at the next one), and schedules the next cleanup.
    pub async fn clean_up(&self, schedule: &mut CleanupSchedule) {
        match self.inbox.cleanup(&self.pool, 1000).await {
            Ok(n) => tracing::debug!(deleted = n, "inbox cleanup"),
            Err(e) => tracing::warn!(error = %e, "inbox cleanup failed; will try again"),
        }
        schedule.next = schedule.every.map(|every| Instant::now() + every);
    }
}

/// When a runner next deletes the inbox's expired records ([`RunnerCore::clean_up`]): `every` after
/// the start, then `every` after the end of each cleanup; never when `every` is `None`.
#[derive(Debug, Clone, Copy)]
pub struct CleanupSchedule {
    every: Option<Duration>,
    next: Option<Instant>,
}

impl CleanupSchedule {
    /// The first cleanup `every` from now; none when `every` is `None`.
    pub fn new(every: Option<Duration>) -> Self {
        CleanupSchedule {
            every,
            next: every.map(|every| Instant::now() + every),
        }
    }

    /// Completes when a cleanup is due; never when cleanups are off.
    pub async fn due(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests;
