//! The broker seam: a `Publisher` sends a batch and reports, per message, what the broker said.

use async_trait::async_trait;

use crate::{Delivered, StoredMessage};

/// How a failed publish should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// Worth retrying, and may be the message's own fault: counts an attempt, so it is
    /// dead-lettered after `max_attempts`.
    Retryable,
    /// Will never succeed (too large, invalid topic, not authorized): dead-letter it.
    Permanent,
    /// The broker cannot take the message now, whatever the message: authentication failed, no
    /// broker reachable, no leader or too few in-sync replicas, no confirmation in time (possibly
    /// persisted). The relay backs the lane off and sends it again later without counting an
    /// attempt, so an outage of any length never dead-letters the backlog.
    Unavailable,
    /// Not sent at all: held back because an earlier message of its key in the same batch could
    /// not be sent. Counts no attempt; the row stays as it is and goes out once its predecessor is
    /// resolved (published, or dead-lettered under `skip`). Behind a message that found the broker
    /// unavailable the publishers report `Unavailable` instead ([`PublishError::behind`]).
    HeldBack,
}

/// A failed publish of one message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct PublishError {
    /// Retry or dead-letter.
    pub kind: FailureKind,
    /// Human-readable cause (logged and stored as `last_error`).
    pub message: String,
}

impl PublishError {
    /// A retryable failure.
    pub fn retryable(message: impl Into<String>) -> Self {
        PublishError {
            kind: FailureKind::Retryable,
            message: message.into(),
        }
    }
    /// A permanent failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        PublishError {
            kind: FailureKind::Permanent,
            message: message.into(),
        }
    }
    /// Held back without being sent (see [`FailureKind::HeldBack`]).
    pub fn held_back(message: impl Into<String>) -> Self {
        PublishError {
            kind: FailureKind::HeldBack,
            message: message.into(),
        }
    }
    /// A message not sent because an earlier message of its key in the same batch failed with
    /// `earlier`: [`Unavailable`](FailureKind::Unavailable) when that one found the broker
    /// unavailable (it could not have been sent either; the relay backs off, nothing counts as an
    /// attempt), [`HeldBack`](FailureKind::HeldBack) otherwise.
    pub fn behind(earlier: FailureKind) -> Self {
        match earlier {
            FailureKind::Unavailable => {
                Self::unavailable("not sent: an earlier message of its key found the broker unavailable")
            }
            _ => Self::held_back("held back: an earlier message of its key failed"),
        }
    }
    /// The broker is unavailable (see [`FailureKind::Unavailable`]).
    pub fn unavailable(message: impl Into<String>) -> Self {
        PublishError {
            kind: FailureKind::Unavailable,
            message: message.into(),
        }
    }
}

/// Sends messages to a broker and waits for its confirmation.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch` in order and returns one outcome per message, in the same order. Returns
    /// only when every message has a delivery report (or a definite failure): `Ok` means the broker
    /// has it.
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>>;
}

#[allow(dead_code)]
fn _object_safe(_: &dyn Publisher) {}

// Lets a caller keep a handle on the publisher the relay owns (`Arc<P>`, `Arc<dyn Publisher>`).
#[async_trait]
impl<T: Publisher + ?Sized> Publisher for std::sync::Arc<T> {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        (**self).publish(batch).await
    }
}
