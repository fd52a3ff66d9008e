//! The one error type of `outbox-nats`: what stops a publisher or a consumer runner from starting
//! or running. Publish failures are not errors here: they are reported per message to the relay.

/// Errors of the NATS adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The configuration cannot work (an unparsable URL, conflicting credentials, a missing stream
    /// name...). The message never contains a password or token.
    #[error("invalid NATS configuration: {0}")]
    Config(String),
    /// The first connection failed (only when the server refuses us; an unreachable server is
    /// retried in the background).
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The server URLs, credentials removed.
        url: String,
        /// The client's reason.
        reason: String,
    },
    /// A JetStream API call (stream or consumer lookup or creation) failed.
    #[error("jetstream: {0}")]
    JetStream(String),
}

impl NatsError {
    pub(crate) fn jetstream(context: &str, e: impl std::fmt::Display) -> Self {
        NatsError::JetStream(format!("{context}: {e}"))
    }
}
