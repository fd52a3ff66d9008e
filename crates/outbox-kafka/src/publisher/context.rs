//! What librdkafka reports about the broker connection: an authentication failure makes every
//! publish fail at once (as `Unavailable`) for a while instead of timing out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::PublishError;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;

/// How long after librdkafka reported an authentication (SASL or TLS) failure a publish fails at
/// once instead of waiting for its delivery reports (librdkafka retries the connection meanwhile).
const AUTH_FAILURE_HOLDS: Duration = Duration::from_secs(5);

/// What librdkafka reported about the broker connection, shared with the producer's context.
#[derive(Default)]
pub(super) struct BrokerState {
    /// The last authentication failure: when, and librdkafka's reason (never holds a secret).
    pub(super) auth_failed: Mutex<Option<(Instant, String)>>,
    /// Wakes publishes waiting for reports when authentication fails.
    pub(super) auth_notify: tokio::sync::Notify,
}

impl BrokerState {
    pub(super) fn recent_auth_failure(&self) -> Option<String> {
        let last = self.auth_failed.lock().expect("broker state lock");
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < AUTH_FAILURE_HOLDS)
            .map(|(_, why)| why.clone())
    }
}

/// The producer's context: librdkafka's global errors, logged; an authentication failure is also
/// recorded so publishes fail at once (as `Unavailable`) instead of timing out.
#[derive(Clone)]
pub(super) struct Context(Arc<BrokerState>);

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        // Authentication (SASL) or the TLS handshake (certificates): the broker cannot be used,
        // whatever the message.
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) {
            tracing::error!(%reason, "broker authentication failed");
            *self.0.auth_failed.lock().expect("broker state lock") = Some((Instant::now(), reason.to_owned()));
            self.0.auth_notify.notify_waiters();
        } else {
            tracing::warn!(%error, %reason, "librdkafka error");
        }
    }
}

/// The producer, with the context that watches for authentication failures.
pub(super) type OutboxProducer = FutureProducer<Context>;

/// A producer with `settings`, reporting to `state`.
pub(super) fn build(
    settings: &BTreeMap<String, String>,
    state: &Arc<BrokerState>,
) -> Result<OutboxProducer, KafkaError> {
    let mut cfg = ClientConfig::new();
    for (k, v) in settings {
        cfg.set(k, v);
    }
    cfg.create_with_context(Context(state.clone()))
}

/// The failure of a message sent while authentication fails.
pub(super) fn auth_failed(why: &str) -> PublishError {
    PublishError::unavailable(format!("broker authentication failed: {why}"))
}
