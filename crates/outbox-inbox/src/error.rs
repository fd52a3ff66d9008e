//! The one error type of `outbox-inbox`: a message the inbox cannot identify, the handler's own
//! failure, or database trouble, with `is_retryable` telling the consumer runner what to do.

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
    /// A framework header (`outbox-id`, `outbox-key`, `outbox-seq`) could not be parsed.
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
            InboxError::Handler(_) => true,
            InboxError::Database(e) => database_retryable(e),
        }
    }
}

fn database_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        // serialization_failure, deadlock_detected, lock/statement timeouts, admin shutdown, too many
        // connections; MySQL deadlock / lock wait timeout; SQLite busy / locked.
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some(
                "40001"
                    | "40P01"
                    | "55P03"
                    | "57014"
                    | "57P01"
                    | "57P02"
                    | "57P03"
                    | "53300"
                    | "1213"
                    | "1205"
                    | "5"
                    | "6"
            )
        ),
        _ => false,
    }
}
