//! The one error type of the `outbox` crate: bad input is told apart from database trouble,
//! and `is_retryable` tells the relay whether trying again can help.

/// Everything that can go wrong in `outbox`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic is empty, longer than 249 characters or has characters Kafka rejects.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic as given.
        topic: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The key is the empty string; use no key instead.
    #[error("invalid key: the key must not be empty (leave it unset for unkeyed messages)")]
    EmptyKey,
    /// A batch holds the message with this id more than once (a clone of a [`crate::Message`] is
    /// the same message): brokers and consumers would take the second copy for a duplicate and
    /// drop it.
    #[error("message {0} is in the batch more than once (a clone keeps its id: build a new message instead)")]
    DuplicateId(uuid::Uuid),
    /// The key holds a NUL character, which PostgreSQL's text cannot store: refused on every
    /// database, so that a key means the same everywhere.
    #[error("invalid key: the key must not contain a NUL character")]
    KeyWithNul,
    /// The key is longer than the database can index ([`crate::postgres::MAX_KEY_BYTES`] on
    /// PostgreSQL).
    #[error("key of {size} bytes exceeds the maximum of {max} bytes this database can index")]
    KeyTooLong {
        /// Key length in bytes.
        size: usize,
        /// The database's maximum.
        max: usize,
    },
    /// The payload is larger than the configured maximum.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A header name the framework sets itself (`outbox-*`) was given by the caller.
    #[error("header name {0:?} is reserved for the framework (prefix `outbox-`)")]
    ReservedHeader(String),
    /// Encoding the payload as JSON failed.
    #[error("could not serialize the payload: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The caller's lease on a lane is no longer current: another relay took the lane over.
    #[error("lease on lane {lane} (epoch {epoch}) is no longer held")]
    StaleLease {
        /// The lane.
        lane: i32,
        /// The epoch the caller held.
        epoch: i64,
    },
    /// A row in the outbox could not be decoded (corrupted or written by something else).
    #[error("corrupt outbox row {id}: {reason}")]
    CorruptRow {
        /// Id of the row.
        id: uuid::Uuid,
        /// What was wrong with it.
        reason: String,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Running the schema migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Error {
    /// True when the input was rejected (topic, key, key length, payload size, reserved header,
    /// payload serialization, a batch holding one message twice): the message was not enqueued,
    /// and the same input fails again. In a request handler the topic, key, payload and header
    /// checks are usually the caller's fault (HTTP 400); a message enqueued twice, or a payload
    /// type that did not serialize, is the service's own bug, as is every other error.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidTopic { .. }
                | Error::EmptyKey
                | Error::DuplicateId(_)
                | Error::KeyWithNul
                | Error::KeyTooLong { .. }
                | Error::PayloadTooLarge { .. }
                | Error::ReservedHeader(_)
                | Error::Serialize(_)
        )
    }

    /// True when trying the same operation again later can succeed (connection trouble, timeouts,
    /// serialization conflicts); false for bad input and lost leases.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => crate::db_error::is_transient(e),
            _ => false,
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_told_apart_from_the_relays_faults() {
        assert!(Error::EmptyKey.is_bad_input());
        assert!(Error::ReservedHeader("outbox-id".into()).is_bad_input());
        assert!(!Error::StaleLease { lane: 1, epoch: 2 }.is_bad_input());
        assert!(!Error::Database(sqlx::Error::PoolTimedOut).is_bad_input());
        assert!(Error::Database(sqlx::Error::PoolTimedOut).is_retryable());
    }
}
