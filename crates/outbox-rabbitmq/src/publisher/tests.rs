use std::sync::Arc;

use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
use outbox::FailureKind;

use super::classify::{channel_closed, classify};

fn amqp(kind: AMQPErrorKind) -> lapin::Error {
    lapin::Error::ProtocolError(AMQPError::new(kind, "test".into()))
}

#[test]
fn classification() {
    let refused = lapin::Error::IOError(Arc::new(std::io::ErrorKind::ConnectionRefused.into()));
    assert_eq!(classify(&refused).kind, FailureKind::Unavailable);
    assert_eq!(
        classify(&lapin::Error::MissingHeartbeatError).kind,
        FailureKind::Unavailable
    );
    let forced = amqp(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED));
    assert_eq!(classify(&forced).kind, FailureKind::Unavailable);
    let too_large = amqp(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED));
    assert_eq!(classify(&too_large).kind, FailureKind::Permanent);
    assert!(channel_closed(&too_large));
    let denied = amqp(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED));
    assert_eq!(classify(&denied).kind, FailureKind::Permanent);
    let no_exchange = amqp(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND));
    assert_eq!(classify(&no_exchange).kind, FailureKind::Unavailable);
    let locked = amqp(AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED));
    assert_eq!(classify(&locked).kind, FailureKind::Retryable);
    assert!(!channel_closed(&refused));
    // A channel closed before the message went out (its connection lost right after it opened):
    // not the message's fault, so no attempt is counted (it was retryable, and counted one).
    let closed = lapin::Error::InvalidChannelState(lapin::ChannelState::Closed);
    assert_eq!(classify(&closed).kind, FailureKind::Unavailable);
    assert!(channel_closed(&closed));
}
