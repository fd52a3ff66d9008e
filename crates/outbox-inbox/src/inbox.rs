//! The inbox itself: its settings, `process` (dedup record and handler in one transaction) and the
//! batched `cleanup` of expired records.

use std::time::Duration;

use crate::{Backend, Handler, InboxError, Incoming, Recorded};

/// How long records of unkeyed messages, and open gaps of keyed ones, are kept by default: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

const MAX_RETENTION_MS: i64 = 1000 * 365 * 24 * 60 * 60 * 1000;

/// What to do when a keyed message skips seqs (the key's highest applied seq is 4 and 6 arrives).
///
/// Either way the gap is logged (`warn`) and counted (`outbox_inbox_gaps_total`), on every delivery
/// that finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Process the message and move the key on. The skipped seqs are recorded as an open gap of
    /// the key: if one of them arrives later (within the retention window), it is processed then,
    /// once, after higher seqs; a seq at or below the key's highest outside every open gap is a
    /// duplicate. The default.
    #[default]
    Accept,
    /// Process nothing, commit nothing and answer [`Outcome::Held`]: deliver it again later, after
    /// the missing messages (for example once an operator replayed a dead letter).
    Hold,
}

/// What [`Inbox::process`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its writes committed with the dedup record.
    Processed,
    /// The message was processed before: the handler did not run.
    Duplicate,
    /// A gap under [`GapPolicy::Hold`]: the handler did not run, nothing was committed. Deliver the
    /// message again later; do not commit its offset.
    Held,
}

impl Outcome {
    /// True when the message is handled for good (processed now or before): the consumer may commit
    /// its offset. False for [`Outcome::Held`].
    pub fn is_done(self) -> bool {
        matches!(self, Outcome::Processed | Outcome::Duplicate)
    }
}

/// Consumer-side idempotency for one consumer (one logical subscriber: services that share a name
/// share their dedup records).
///
/// ```
/// use std::time::Duration;
/// use outbox_inbox::{GapPolicy, Inbox};
/// let inbox = Inbox::new("billing").gap_policy(GapPolicy::Hold).retention(Duration::from_secs(86_400));
/// assert_eq!(inbox.consumer(), "billing");
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
    gap_policy: GapPolicy,
    retention: Duration,
}

impl Inbox {
    /// An inbox for `consumer`, with the default gap policy ([`GapPolicy::Accept`]) and retention
    /// (7 days).
    pub fn new(consumer: impl Into<String>) -> Self {
        Inbox {
            consumer: consumer.into(),
            gap_policy: GapPolicy::default(),
            retention: DEFAULT_RETENTION,
        }
    }

    /// What to do when a keyed message skips seqs. Defaults to [`GapPolicy::Accept`].
    pub fn gap_policy(mut self, policy: GapPolicy) -> Self {
        self.gap_policy = policy;
        self
    }

    /// How long records of unkeyed messages are kept, so how long after its first delivery a
    /// duplicate unkeyed message is still recognised. Keyed messages are recognised forever.
    ///
    /// Also how long an open gap of a key (seqs skipped under [`GapPolicy::Accept`]) is kept: a
    /// skipped message arriving later than that after the gap was seen is taken for a duplicate
    /// and not processed. Defaults to 7 days.
    pub fn retention(mut self, window: Duration) -> Self {
        self.retention = window;
        self
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Processes one delivered message, effectively once: in one transaction on `pool` it records
    /// the message, then runs `handler` with that transaction and commits. The handler's writes and
    /// the record commit together or not at all.
    ///
    /// A duplicate (or a message held back by [`GapPolicy::Hold`]) does not run the handler and
    /// commits nothing but, at most, the tidying of its key's gap bookkeeping. A keyed message that
    /// was skipped by a gap and arrives late is processed (see [`GapPolicy::Accept`]). Concurrent
    /// deliveries of one message wait for each other: one processes it, the others see a
    /// duplicate. On a handler error everything is rolled back and the error is
    /// returned ([`InboxError::is_retryable`] is true): deliver the message again.
    ///
    /// Commit the consumer offset only when the outcome [`is_done`](Outcome::is_done).
    #[tracing::instrument(name = "process", skip_all, fields(outbox.id = %msg.id, consumer = %self.consumer))]
    pub async fn process<DB, H>(
        &self,
        pool: &sqlx::Pool<DB>,
        msg: &Incoming<'_>,
        handler: &H,
    ) -> Result<Outcome, InboxError<H::Error>>
    where
        DB: Backend,
        H: Handler<DB> + ?Sized,
    {
        let mut tx = pool.begin().await?;
        // For a message new at the top of its key: the key's highest seq before it.
        let advanced_from = match DB::record(&mut *tx, &self.consumer, msg).await? {
            Recorded::Duplicate => {
                // End the transaction now to release the key row. Commit rather than roll back: a
                // duplicate writes nothing, except that looking at the key's gaps may have repaired
                // its gap_from (left too low by the cleanup); keeping that spares later duplicates.
                tx.commit().await?;
                tracing::debug!(key = msg.key, seq = msg.seq, "duplicate, skipped");
                self.count("outbox_inbox_duplicates_total");
                return Ok(Outcome::Duplicate);
            }
            Recorded::New { previous } => Some(previous),
            Recorded::FilledGap { from, to } => {
                // Skipped when a higher seq was accepted, arriving now: applied late, under either
                // policy (the key has moved on already; holding it would fill nothing).
                tracing::info!(
                    key = msg.key,
                    seq = msg.seq,
                    gap.from = from,
                    gap.to = to,
                    "late message of a recorded gap: processing it"
                );
                self.count("outbox_inbox_gap_fills_total");
                None
            }
        };
        if let (Some((key, seq)), Some(previous)) = (msg.key_seq(), advanced_from) {
            // A key never seen starts at 1: seqs are dense per key from the first message on.
            let expected = previous.unwrap_or(0) + 1;
            if seq > expected {
                tracing::warn!(
                    key,
                    seq,
                    expected,
                    policy = ?self.gap_policy,
                    "gap in the key's sequence: messages {expected}..{seq} (exclusive) were not processed"
                );
                // `record` recorded the gap: under Accept it commits with this message and the
                // skipped messages are processed if they come later; Hold rolls it back.
                self.count("outbox_inbox_gaps_total");
                if self.gap_policy == GapPolicy::Hold {
                    tx.rollback().await?;
                    return Ok(Outcome::Held);
                }
            }
        }
        if let Err(e) = handler.handle(&mut tx, msg).await {
            // The handler's error is what the caller needs; a failed rollback leaves the server to
            // roll back when the connection closes.
            let _ = tx.rollback().await;
            return Err(InboxError::Handler(e));
        }
        tx.commit().await?;
        self.count("outbox_inbox_processed_total");
        Ok(Outcome::Processed)
    }

    /// Deletes the records of this consumer's unkeyed messages that are older than the retention
    /// window, then its open gaps recorded longer ago than the window, `batch_size` rows per short
    /// transaction (so it never holds locks for long), until a batch comes back short. Per-key
    /// records (the highest seq) are kept. Returns how many rows it deleted.
    ///
    /// Run it now and then (say hourly) from one place; concurrent runs are safe, just wasteful.
    #[tracing::instrument(name = "cleanup", skip_all, fields(consumer = %self.consumer))]
    pub async fn cleanup<DB: Backend>(&self, pool: &sqlx::Pool<DB>, batch_size: u32) -> Result<u64, InboxError> {
        let batch = i64::from(batch_size.max(1));
        // Capped at about 1000 years so the database's interval arithmetic cannot overflow.
        let retention_ms = i64::try_from(self.retention.as_millis())
            .unwrap_or(i64::MAX)
            .min(MAX_RETENTION_MS);
        let mut deleted = [0u64; 2];
        for (table, total) in deleted.iter_mut().enumerate() {
            loop {
                let n = if table == 0 {
                    DB::delete_expired(pool, &self.consumer, retention_ms, batch).await?
                } else {
                    DB::delete_expired_gaps(pool, &self.consumer, retention_ms, batch).await?
                };
                *total += n;
                if n < batch as u64 {
                    break;
                }
                // Each batch has committed; a long cleanup must not starve the runtime's other
                // tasks.
                tokio::task::yield_now().await;
            }
        }
        let [messages, gaps] = deleted;
        tracing::info!(messages, gaps, "cleaned up expired inbox records");
        Ok(messages + gaps)
    }

    fn count(&self, name: &'static str) {
        metrics::counter!(name, "consumer" => self.consumer.clone()).increment(1);
    }
}
