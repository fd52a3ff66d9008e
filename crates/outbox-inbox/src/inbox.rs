//! The inbox itself: its settings, `process` (dedup record and handler in one transaction, parked
//! successors applied in the same one) and the batched `cleanup` of expired records.

use std::time::Duration;

use crate::{Backend, Handler, InboxError, Incoming, Recorded, MAX_SOURCE_LEN};

/// How long records of unkeyed messages are kept by default: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

const MAX_RETENTION_MS: i64 = 1000 * 365 * 24 * 60 * 60 * 1000;

/// What a keyed message means when it skips seqs (the key's highest applied seq is 4 and 6
/// arrives): seqs are dense per (source, key) from 1, across every topic the outbox sends the key
/// to.
///
/// Whatever the policy, nothing waits: every outcome of [`Inbox::process`] is
/// [done](Outcome::is_done), so a consumer runner commits the offset and goes on with the
/// partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Process the message and move the key on. The skipped seqs are recorded as an open gap of
    /// the key, kept until filled: if one of them arrives later, however much later, it is
    /// processed then, once, after higher seqs; a seq at or below the key's highest outside every
    /// open gap is a duplicate. The gap is logged (`warn`) and counted (`outbox_inbox_gaps_total`).
    /// For a consumer that reads every topic its keys' messages are sent to. The default.
    #[default]
    Accept,
    /// Apply the messages of a key in seq order. A message whose predecessor has not been applied
    /// is parked (kept whole in the inbox's tables, in its own transaction) and answers
    /// [`Outcome::Parked`]; when the predecessor is applied, the parked messages that follow it
    /// are applied in the same transaction (each in a savepoint), by the same handler, in seq
    /// order; one that fails stays parked (see [`Inbox::process`]). Nothing is skipped,
    /// so no gap is recorded. For a consumer that reads every topic its keys' messages are sent
    /// to: a message whose predecessor never reaches it stays parked (see the crate
    /// documentation).
    Hold,
    /// Like [`Accept`](GapPolicy::Accept), but skipped seqs are expected, not a sign of trouble:
    /// recorded as open gaps the same way (a late message is still processed, once), neither
    /// logged above `debug` nor counted. For a consumer that reads only some of the topics its
    /// keys' messages are sent to: the seqs of the others are never delivered to it.
    Expect,
}

/// What [`Inbox::process`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its writes committed with the dedup record (under [`GapPolicy::Hold`],
    /// with those of the parked messages that followed it).
    Processed,
    /// The message was processed (or parked) before: the handler did not run for it. (Under
    /// [`GapPolicy::Hold`], parked messages that follow its key's highest applied seq, left by a
    /// parked message that failed, are applied now: see [`InboxError::ParkedHandler`].)
    Duplicate,
    /// Under [`GapPolicy::Hold`], the message's predecessor has not been applied: the message is
    /// parked in the inbox's tables (committed), and will be applied right after its predecessor,
    /// in the predecessor's transaction. The handler did not run.
    Parked,
}

impl Outcome {
    /// True when the consumer may commit the message's offset: it is processed now or before, or
    /// parked in the inbox's tables (applied with its predecessor). True for every outcome: a
    /// message never has to be delivered again once `process` returned `Ok`.
    pub fn is_done(self) -> bool {
        match self {
            Outcome::Processed | Outcome::Duplicate | Outcome::Parked => true,
        }
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
    /// duplicate unkeyed message is still recognised. Defaults to 7 days.
    ///
    /// Keyed messages are recognised forever, whatever the window: per (source, key) the highest
    /// applied seq and the open gaps (seqs skipped under [`GapPolicy::Accept`] or
    /// [`GapPolicy::Expect`]) are kept until the gap is filled, and parked messages until they are
    /// applied.
    pub fn retention(mut self, window: Duration) -> Self {
        self.retention = window;
        self
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// How long records of unkeyed messages are kept (see [`Inbox::retention`]).
    pub fn retention_window(&self) -> Duration {
        self.retention
    }

    /// Processes one delivered message, effectively once: in one transaction on `pool` it records
    /// the message, then runs `handler` with that transaction and commits. The handler's writes and
    /// the record commit together or not at all.
    ///
    /// A duplicate does not run the handler and commits nothing but, at most, the tidying of its
    /// key's gap bookkeeping. A keyed message that was skipped by a gap and arrives late is
    /// processed (see [`GapPolicy::Accept`]). Under [`GapPolicy::Hold`] a message whose
    /// predecessor has not been applied is parked (committed, the handler does not run), and a
    /// message that is applied brings the parked messages that follow it along, in its
    /// transaction. Concurrent deliveries of one message wait for each other: one processes it,
    /// the others see a duplicate. On a handler error everything is rolled back and the error is
    /// returned ([`InboxError::is_retryable`] is true): deliver the message again. On a parked
    /// message's error ([`InboxError::ParkedHandler`], also retryable) the message and the parked
    /// ones before the failed one are committed, the failed one stays parked: delivering the
    /// message again (a duplicate now) tries it again.
    ///
    /// Commit the consumer offset when the outcome [`is_done`](Outcome::is_done) (every `Ok`).
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
        if msg.source.is_some_and(|s| s.len() > MAX_SOURCE_LEN) {
            return Err(InboxError::MalformedHeader {
                name: outbox::HEADER_SOURCE,
                reason: format!("more than {MAX_SOURCE_LEN} bytes"),
            });
        }
        if let Some(seq) = msg.seq.filter(|_| msg.key.is_some()) {
            crate::incoming::check_seq(seq).map_err(|reason| InboxError::MalformedHeader {
                name: outbox::HEADER_SEQ,
                reason,
            })?;
        }
        let hold = self.gap_policy == GapPolicy::Hold;
        let mut tx = pool.begin().await?;
        // For a message new at the top of its key: the key's highest seq before it.
        let advanced_from = match DB::record(&mut *tx, &self.consumer, msg, hold).await? {
            Recorded::Duplicate => {
                // Under Hold, a parked message that failed after this one was applied (see
                // `apply_parked_successors`) is tried again on its redelivery.
                let (unparked, failed) = match (hold, msg.key_seq()) {
                    (true, Some((key, _))) => self.apply_parked_successors(&mut tx, msg, key, None, handler).await?,
                    _ => (0, None),
                };
                // End the transaction now to release the key row. Commit rather than roll back: a
                // duplicate writes nothing (but the parked messages just applied), except that
                // looking at the key's gaps may have repaired its gap_from; keeping that spares
                // later duplicates.
                tx.commit().await?;
                tracing::debug!(key = msg.key, seq = msg.seq, "duplicate, skipped");
                self.count("outbox_inbox_duplicates_total", 1);
                self.count_unparked(unparked);
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(Outcome::Duplicate),
                };
            }
            Recorded::Parked { previous } => {
                tx.commit().await?;
                let applied = previous.unwrap_or(0);
                tracing::info!(
                    key = msg.key,
                    seq = msg.seq,
                    source = msg.source,
                    applied,
                    "parked: seqs after {applied} not applied yet; applied right after them"
                );
                self.count("outbox_inbox_parked_total", 1);
                return Ok(Outcome::Parked);
            }
            Recorded::New { previous } => Some(previous),
            Recorded::FilledGap { from, to } => {
                // Skipped when a higher seq was accepted, arriving now: applied late, under every
                // policy (the key has moved on already; parking it would wait for nothing).
                tracing::info!(
                    key = msg.key,
                    seq = msg.seq,
                    gap.from = from,
                    gap.to = to,
                    "late message of a recorded gap: processing it"
                );
                self.count("outbox_inbox_gap_fills_total", 1);
                None
            }
        };
        if let (Some((key, seq)), Some(previous)) = (msg.key_seq(), advanced_from) {
            // A key never seen starts at 1: seqs are dense per key from the first message on.
            let expected = previous.unwrap_or(0) + 1;
            if seq > expected {
                // `record` recorded the skipped seqs as an open gap (Hold parks instead).
                if self.gap_policy == GapPolicy::Accept {
                    tracing::warn!(
                        key,
                        seq,
                        expected,
                        source = msg.source,
                        "gap in the key's sequence: messages {expected}..{seq} (exclusive) were not processed"
                    );
                    self.count("outbox_inbox_gaps_total", 1);
                } else {
                    tracing::debug!(
                        key,
                        seq,
                        expected,
                        source = msg.source,
                        "seqs not delivered to this consumer"
                    );
                }
            }
        }
        if let Err(e) = handler.handle(&mut tx, msg).await {
            // The handler's error is what the caller needs; a failed rollback leaves the server to
            // roll back when the connection closes.
            let _ = tx.rollback().await;
            return Err(InboxError::Handler(e));
        }
        // A statement of the handler's that failed on PostgreSQL aborted the transaction, and what
        // runs in it from then on fails (25P02): the handler's error, not the database's.
        let (unparked, failed) = match (hold, msg.key_seq(), advanced_from) {
            (true, Some((key, seq)), Some(_)) => self
                .apply_parked_successors(&mut tx, msg, key, Some(seq), handler)
                .await
                .map_err(|e| match e {
                    InboxError::Database(e) => failed_statement(e),
                    other => other,
                })?,
            _ => (0, None),
        };
        DB::commit_checked(tx).await.map_err(failed_statement)?;
        self.count("outbox_inbox_processed_total", 1);
        self.count_unparked(unparked);
        match failed {
            Some(e) => Err(e),
            None => Ok(Outcome::Processed),
        }
    }

    /// Under [`GapPolicy::Hold`], on `tx` that holds the key row: applies the parked messages that
    /// follow the key's highest applied seq (`applied`: the message just applied; `None` for a
    /// redelivery, whose key may have gone past it: then it is read when something is parked),
    /// while they follow, each in a savepoint of its own. Returns how many it applied and, when
    /// the handler failed on one, the error naming it: that one's writes are rolled back to its
    /// savepoint and it stays parked, the ones before it stay applied. A parked message that fails
    /// every time thus holds back only itself and what follows it, never the message before it.
    async fn apply_parked_successors<DB, H>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        msg: &Incoming<'_>,
        key: &str,
        applied: Option<i64>,
        handler: &H,
    ) -> Result<(u64, Option<InboxError<H::Error>>), InboxError<H::Error>>
    where
        DB: Backend,
        H: Handler<DB> + ?Sized,
    {
        let mut top = applied;
        let mut unparked = 0;
        // One read when nothing is parked (the common case): no savepoint.
        while let Some(next) = DB::lowest_parked(&mut **tx, &self.consumer, msg.scope(), key).await? {
            let highest = match top {
                Some(t) => t,
                None => DB::key_seq(&mut **tx, &self.consumer, msg.scope(), key)
                    .await?
                    .unwrap_or(0),
            };
            if next <= highest {
                // A copy of a message applied since it was parked: it would hold the key for ever.
                DB::drop_parked_upto(&mut **tx, &self.consumer, msg.scope(), key, highest).await?;
                continue;
            }
            if next != highest + 1 {
                break;
            }
            let mut step = sqlx::Connection::begin(&mut **tx).await?;
            let Some((parked, _)) = DB::unpark(&mut *step, &self.consumer, msg.scope(), key, next, false).await? else {
                break;
            };
            let successor = parked.incoming(key, next, msg.source);
            tracing::info!(key, seq = next, outbox.id = %parked.id, "applying a parked message");
            let failed = match handler.handle(&mut step, &successor).await {
                Ok(()) => usable::<DB, _>(&mut *step).await.err(),
                Err(error) => Some(InboxError::Handler(error)),
            };
            if let Some(failed) = failed {
                step.rollback().await?;
                tracing::warn!(
                    key,
                    seq = next,
                    outbox.id = %parked.id,
                    "a parked message failed: it stays parked, the message before it is applied"
                );
                self.count("outbox_inbox_parked_failures_total", 1);
                let (id, seq) = (parked.id, next);
                let failed = match failed {
                    InboxError::Handler(error) => InboxError::ParkedHandler { id, seq, error },
                    InboxError::HandlerAborted(error) => InboxError::ParkedAborted { id, seq, error },
                    other => other,
                };
                return Ok((unparked, Some(failed)));
            }
            step.commit().await?;
            unparked += 1;
            top = Some(next);
        }
        Ok((unparked, None))
    }

    fn count_unparked(&self, unparked: u64) {
        if unparked > 0 {
            self.count("outbox_inbox_processed_total", unparked);
            self.count("outbox_inbox_unparked_total", unparked);
        }
    }

    /// Gives up waiting for the missing predecessors of `key`'s parked messages (from `source`;
    /// `None`: messages without an `outbox-source`): applies every parked message of the key, in
    /// seq order, with `handler`, in one transaction, and returns how many. The seqs skipped on the
    /// way are recorded as open gaps, as [`GapPolicy::Accept`] does: if one of them arrives later,
    /// it is still processed, once. On a handler error nothing is applied or released.
    ///
    /// For an operator, when a message under [`GapPolicy::Hold`] waits for one that will never
    /// come: the consumer started after the topic's first messages were deleted, the missing
    /// message was dead-lettered and discarded, or it was sent to a topic this consumer does not
    /// read. The parked messages are in `outbox_inbox_parked` (consumer, source, key, seq).
    #[tracing::instrument(name = "release_parked", skip_all, fields(consumer = %self.consumer, key))]
    pub async fn release_parked<DB, H>(
        &self,
        pool: &sqlx::Pool<DB>,
        source: Option<&str>,
        key: &str,
        handler: &H,
    ) -> Result<u64, InboxError<H::Error>>
    where
        DB: Backend,
        H: Handler<DB> + ?Sized,
    {
        let source = source.filter(|s| !s.is_empty());
        let scope = source.unwrap_or("");
        // Nothing parked: nothing to lock (a statement of its own, so that in the transaction below
        // the key row is locked before any parked row).
        let mut conn = pool.acquire().await?;
        if DB::lowest_parked(&mut conn, &self.consumer, scope, key)
            .await?
            .is_none()
        {
            return Ok(0);
        }
        drop(conn);
        let mut tx = pool.begin().await?;
        // Every parked message of the key was written under the key row's lock (the row stays
        // while they wait): with it held, none is being parked or applied meanwhile.
        DB::lock_key(&mut *tx, &self.consumer, scope, key).await?;
        // Copies of messages applied since they were parked are not released again: dropped.
        if let Some(highest) = DB::key_seq(&mut *tx, &self.consumer, scope, key).await? {
            DB::drop_parked_upto(&mut *tx, &self.consumer, scope, key, highest).await?;
        }
        let (mut applied, mut gaps) = (0, 0);
        while let Some(seq) = DB::lowest_parked(&mut *tx, &self.consumer, scope, key).await? {
            let Some((parked, previous)) = DB::unpark(&mut *tx, &self.consumer, scope, key, seq, true).await? else {
                break;
            };
            if previous + 1 < seq {
                tracing::warn!(
                    key,
                    source,
                    seq,
                    "given up waiting for messages {}..{seq} (exclusive)",
                    previous + 1
                );
                gaps += 1;
            }
            let msg = parked.incoming(key, seq, source);
            if let Err(e) = handler.handle(&mut tx, &msg).await {
                let _ = tx.rollback().await;
                return Err(InboxError::Handler(e));
            }
            if let Err(e) = usable::<DB, _>(&mut *tx).await {
                let _ = tx.rollback().await;
                return Err(e);
            }
            applied += 1;
        }
        tx.commit().await?;
        if applied > 0 {
            tracing::info!(
                key,
                source,
                applied,
                "released parked messages; the seqs missing before them are open gaps"
            );
            self.count_unparked(applied);
            self.count("outbox_inbox_gaps_total", gaps);
        }
        Ok(applied)
    }

    /// Deletes the records of this consumer's unkeyed messages that are older than the retention
    /// window, `batch_size` rows per short transaction (so it never holds locks for long), until a
    /// batch comes back short. Returns how many rows it deleted.
    ///
    /// Records of keyed messages are never deleted: the per-key highest seqs, the open gaps (a
    /// skipped message arriving a month later, a dead letter replayed, say, must still be
    /// processed, not taken for a duplicate) and the parked messages (they wait for their
    /// predecessor).
    ///
    /// Run it now and then (say hourly) from one place; concurrent runs are safe, just wasteful.
    #[tracing::instrument(name = "cleanup", skip_all, fields(consumer = %self.consumer))]
    pub async fn cleanup<DB: Backend>(&self, pool: &sqlx::Pool<DB>, batch_size: u32) -> Result<u64, InboxError> {
        let batch = i64::from(batch_size.max(1));
        // Capped at about 1000 years so the database's interval arithmetic cannot overflow.
        let retention_ms = i64::try_from(self.retention.as_millis())
            .unwrap_or(i64::MAX)
            .min(MAX_RETENTION_MS);
        let mut messages = 0;
        loop {
            let n = DB::delete_expired(pool, &self.consumer, retention_ms, batch).await?;
            messages += n;
            if n < batch as u64 {
                break;
            }
            // Each batch has committed; a long cleanup must not starve the runtime's other tasks.
            tokio::task::yield_now().await;
        }
        tracing::info!(messages, "cleaned up expired inbox records");
        Ok(messages)
    }

    fn count(&self, name: &'static str, n: u64) {
        metrics::counter!(name, "consumer" => self.consumer.clone()).increment(n);
    }
}

/// After the handler returned `Ok`: fails when its transaction can no longer commit
/// ([`InboxError::HandlerAborted`]: a statement of the handler's failed and the database aborted
/// the transaction) or the check itself failed ([`InboxError::Database`]).
async fn usable<DB: Backend, E>(conn: &mut <DB as sqlx::Database>::Connection) -> Result<(), InboxError<E>> {
    DB::check_usable(conn).await.map_err(failed_statement)
}

/// A database error on the handler's transaction after the handler returned:
/// [`InboxError::HandlerAborted`] when the handler's own work is why it cannot commit (a statement
/// of its failed and aborted the transaction, 25P02; its writes broke a constraint checked only at
/// commit: a deferred foreign key or unique key, class 23, a deferred constraint trigger that
/// raised, P0001, SQLite's constraint codes), [`InboxError::Database`] otherwise. Taken for
/// database trouble, such a message was waited for for ever instead of retried and dead-lettered.
fn failed_statement<E>(e: sqlx::Error) -> InboxError<E> {
    let handlers = e.as_database_error().and_then(|d| d.code()).is_some_and(|code| {
        code == "25P02" || code.starts_with("23") || code == "P0001" || matches!(&*code, "19" | "787")
    });
    if handlers {
        InboxError::HandlerAborted(e)
    } else {
        InboxError::Database(e)
    }
}
