//! The one error type of `outbox-inbox`: a message the inbox cannot identify, the handler's own
//! failure, or database trouble, with `is_retryable` and `is_infrastructure` telling the consumer
//! runner what to do.

use std::convert::Infallible;

/// Everything that can go wrong in the inbox. `E` is the handler's error type; operations that run
/// no handler ([`Incoming::from_headers`](crate::Incoming::from_headers),
/// [`Inbox::cleanup`](crate::Inbox::cleanup)) use the default, [`Infallible`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError<E = Infallible> {
    /// A header the inbox needs (`outbox-id`) is not on the message.
    #[error("message has no {0:?} header")]
    MissingHeader(&'static str),
    /// A framework header (`outbox-id`, `outbox-key`, `outbox-seq`, `outbox-source`) could not be
    /// parsed.
    #[error("malformed {name:?} header: {reason}")]
    MalformedHeader {
        /// The header name.
        name: &'static str,
        /// What was wrong with its value.
        reason: String,
    },
    /// The handler failed. Its writes and the dedup record were rolled back.
    #[error("handler failed: {0}")]
    Handler(#[source] E),
    /// Under [`GapPolicy::Hold`](crate::GapPolicy::Hold): the message was applied and committed,
    /// with the parked messages before `seq`, but the handler failed on the parked message `seq`
    /// of its key (id `id`) that follows them. That one's writes were rolled back and it stays
    /// parked; delivering the message again (now a duplicate) tries it again. When the tries run
    /// out, the parked message is the one to dead-letter ([`InboxError::parked`],
    /// [`RunnerCore::dead_letter_parked`](crate::RunnerCore::dead_letter_parked)).
    #[error("the message was applied, but parked message {id} (seq {seq} of its key) failed: {error}")]
    ParkedHandler {
        /// The parked message's `outbox-id`.
        id: uuid::Uuid,
        /// Its seq.
        seq: i64,
        /// The handler's error.
        #[source]
        error: E,
    },
    /// Under [`GapPolicy::Hold`](crate::GapPolicy::Hold): as [`InboxError::ParkedHandler`], but the
    /// handler returned `Ok` on the parked message `seq` (id `id`) while a statement of its had
    /// failed and aborted its savepoint's work (see [`InboxError::HandlerAborted`]).
    #[error(
        "the message was applied, but parked message {id} (seq {seq} of its key) aborted its transaction: {error}"
    )]
    ParkedAborted {
        /// The parked message's `outbox-id`.
        id: uuid::Uuid,
        /// Its seq.
        seq: i64,
        /// The database's answer to the inbox's check.
        #[source]
        error: sqlx::Error,
    },
    /// The handler returned `Ok`, but a statement of its failed and the error was not passed on:
    /// PostgreSQL aborts a transaction at a failed statement (and its COMMIT rolls back), so
    /// nothing was committed, neither the handler's writes nor the record. Delivering the message
    /// again runs the handler again. The database's answer to the inbox's check is the source.
    ///
    /// Also when the handler's writes broke a constraint the database checks only at commit (a
    /// deferred foreign key): the COMMIT failed, nothing was committed, and the message fails the
    /// same way on every delivery (retried, then dead-lettered).
    #[error("the handler returned Ok, but its transaction could not commit (a statement of its failed, or a deferred constraint): {0}")]
    HandlerAborted(#[source] sqlx::Error),
    /// The database failed. Nothing was committed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl<E> InboxError<E> {
    /// True when delivering the same message again later can succeed: the handler failed (everything
    /// was rolled back, so it runs again), or the database had connection trouble, a timeout, a
    /// serialization failure or a deadlock. False for a message without a usable `outbox-id`: no
    /// retry can fix it.
    pub fn is_retryable(&self) -> bool {
        match self {
            InboxError::MissingHeader(_) | InboxError::MalformedHeader { .. } => false,
            InboxError::Handler(_)
            | InboxError::ParkedHandler { .. }
            | InboxError::ParkedAborted { .. }
            | InboxError::HandlerAborted(_) => true,
            InboxError::Database(e) => database_retryable(e),
        }
    }

    /// The parked message (its id and seq) that failed after the delivered message was applied
    /// ([`InboxError::ParkedHandler`], [`InboxError::ParkedAborted`]): the one to dead-letter when
    /// the tries run out, not the delivered message.
    pub fn parked(&self) -> Option<(uuid::Uuid, i64)> {
        match self {
            InboxError::ParkedHandler { id, seq, .. } | InboxError::ParkedAborted { id, seq, .. } => Some((*id, *seq)),
            _ => None,
        }
    }

    /// True for database trouble ([`InboxError::Database`]): the connection or the pool, a
    /// timeout, a deadlock, a statement the database refused. The message is not at fault, and
    /// nothing was committed: a consumer runner waits for the database and delivers the message
    /// again (however long that takes) instead of counting the failure against the message or
    /// dead-lettering it. False for the handler's own error ([`InboxError::Handler`]), for a
    /// message the inbox cannot identify ([`InboxError::MissingHeader`],
    /// [`InboxError::MalformedHeader`]), and for a value of the message the database cannot hold
    /// (a key with a NUL character in PostgreSQL, a key too long for an index entry, a topic
    /// longer than its column: [`outbox::db_error::is_refused_value`]), which fails the same way
    /// on every delivery: a runner dead-letters it instead of waiting forever.
    ///
    /// Independent of [`is_retryable`](Self::is_retryable), which tells whether the same delivery
    /// can succeed later: a constraint violation is infrastructure but not retryable, a handler
    /// error is retryable but not infrastructure.
    pub fn is_infrastructure(&self) -> bool {
        matches!(self, InboxError::Database(e) if !outbox::db_error::is_refused_value(e))
    }
}

fn database_retryable(e: &sqlx::Error) -> bool {
    outbox::db_error::is_transient(e)
}
