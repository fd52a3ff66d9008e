//! What a failed publish means for the relay, from lapin's error.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
#[cfg(doc)]
use outbox::FailureKind;
use outbox::PublishError;

/// Decides what the relay does with a row the broker failed, from lapin's error.
///
/// The connection (refused, closed, reset, heartbeat missed, closed by the server), a channel closed
/// before the message went out, or an exchange that is gone: [`FailureKind::Unavailable`], whatever
/// the message. The server closing the channel for the message itself, when it was the only one in
/// flight: `PRECONDITION_FAILED` (too large, invalid headers), `ACCESS_REFUSED` (no write permission
/// for the routing key), `CONTENT_TOO_LARGE`, `NO_ROUTE`: [`FailureKind::Permanent`]. Anything else
/// is [`FailureKind::Retryable`].
pub fn classify(e: &lapin::Error) -> PublishError {
    use lapin::Error as E;
    match e {
        E::IOError(_)
        | E::InvalidConnectionState(_)
        | E::MissingHeartbeatError
        | E::ChannelsLimitReached
        | E::InvalidProtocolVersion(_) => PublishError::unavailable(format!("connection: {e}")),
        // Seen where a message goes out on a channel already closed: lost with its connection (a
        // channel the server closed for a message is seen as that close, and sent again alone).
        E::InvalidChannelState(_) => PublishError::unavailable(format!("channel closed: {e}")),
        E::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(_) => PublishError::unavailable(format!("connection closed by the server: {e}")),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => PublishError::unavailable(format!("exchange missing: {e}")),
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::CONTENTTOOLARGE
                | AMQPSoftError::NOROUTE,
            ) => PublishError::permanent(e.to_string()),
            AMQPErrorKind::Soft(_) => PublishError::retryable(e.to_string()),
        },
        _ => PublishError::retryable(e.to_string()),
    }
}

/// True when `e` means the server closed the channel (or it is closing), not the connection: the
/// message that caused it is one of those in flight on the channel, not necessarily this one.
pub(super) fn channel_closed(e: &lapin::Error) -> bool {
    match e {
        lapin::Error::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Soft(_)),
        lapin::Error::InvalidChannelState(_) => true,
        _ => false,
    }
}
