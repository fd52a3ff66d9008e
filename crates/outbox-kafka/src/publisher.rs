//! `KafkaPublisher`: the relay's [`Publisher`] on rdkafka. Idempotent producer with `acks=all`; a
//! message counts as delivered only when its delivery report says so.

mod context;
mod settings;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox::{
    Delivered, FailureKind, PublishError, Publisher, StoredMessage, HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};

use context::{auth_failed, build, BrokerState, OutboxProducer};
use settings::{effective, redact_error};
pub use settings::{redacted, PRODUCER_DEFAULTS};

/// Publishes outbox rows to Kafka. Clone-free and shared by all lanes of a relay.
pub struct KafkaPublisher {
    settings: BTreeMap<String, String>,
    state: Arc<BrokerState>,
    producer: Mutex<Arc<OutboxProducer>>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("settings", &redacted(&self.settings))
            .finish()
    }
}

impl KafkaPublisher {
    /// A publisher from librdkafka settings (`bootstrap.servers`, TLS, SASL...), passed through
    /// unchanged; [`PRODUCER_DEFAULTS`] fill in what is not set.
    pub fn new<K, V>(settings: impl IntoIterator<Item = (K, V)>) -> Result<Self, KafkaError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let map = effective(settings.into_iter().map(|(k, v)| (k.into(), v.into())).collect())?;
        let state = Arc::new(BrokerState::default());
        let producer = build(&map, &state).map_err(redact_error)?;
        Ok(KafkaPublisher {
            settings: map,
            state,
            producer: Mutex::new(Arc::new(producer)),
        })
    }

    /// The effective settings (secrets redacted).
    pub fn settings(&self) -> BTreeMap<String, String> {
        redacted(&self.settings)
    }

    fn current(&self) -> Arc<OutboxProducer> {
        self.producer.lock().expect("producer lock").clone()
    }

    /// A fatal error (e.g. out-of-order sequence) makes the producer unusable: build a new one.
    /// The failed rows come back unavailable and are re-sent in order by the relay.
    fn rebuild_if_fatal(&self, used: &Arc<OutboxProducer>) {
        let Some((code, reason)) = used.client().fatal_error() else {
            return;
        };
        let mut slot = self.producer.lock().expect("producer lock");
        if !Arc::ptr_eq(&slot, used) {
            return; // another lane already rebuilt it
        }
        tracing::error!(?code, %reason, "fatal producer error; rebuilding the producer");
        match build(&self.settings, &self.state).map_err(redact_error) {
            Ok(p) => *slot = Arc::new(p),
            Err(e) => tracing::error!(error = %e, "could not rebuild the producer; will try again"),
        }
    }

    /// Waits until every queued message has a delivery report, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.current().flush(timeout)
    }
}

/// Decides retry or dead letter from a Kafka error.
pub fn classify(e: &KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidTopic
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::InvalidRequiredAcks,
        ) => PublishError::permanent(e.to_string()),
        // The cluster cannot take the message right now, whatever the message: no leader, too few
        // in-sync replicas, no broker reachable, or no answer within message.timeout.ms. An outage
        // is not the message's fault: no attempt is counted, the lane backs off for as long as it
        // lasts, so a long outage dead-letters nothing.
        Some(C::MessageTimedOut | C::RequestTimedOut) => {
            PublishError::unavailable(format!("{e} (possibly persisted; will resend, consumers deduplicate)"))
        }
        Some(
            C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::BrokerNotAvailable
            | C::ReplicaNotAvailable,
        ) => PublishError::unavailable(e.to_string()),
        // The producer failed fatally (see `rebuild_if_fatal`): what it held is purged, what was
        // sent to it fails until it is rebuilt. Not the messages' fault: no attempt counted.
        Some(C::Fatal | C::PurgeQueue | C::PurgeInflight) => {
            PublishError::unavailable(format!("{e} (the producer failed fatally and is rebuilt)"))
        }
        _ => PublishError::retryable(e.to_string()),
    }
}

/// The Kafka headers of a row: the `outbox-*` ones, then the row's own.
fn headers(row: &StoredMessage) -> OwnedHeaders {
    let id = row.id.to_string();
    let seq = row.seq.map(|s| s.to_string());
    let outbox = [
        (HEADER_ID, Some(id.as_str())),
        (HEADER_KEY, row.key.as_deref()),
        (HEADER_SEQ, seq.as_deref()),
        (HEADER_SOURCE, row.source.as_deref()),
    ];
    let own = row.headers.iter().map(|(k, v)| (k.as_str(), Some(v.as_str())));
    wire_headers(outbox.into_iter().chain(own))
}

/// Kafka headers from `(name, value)` pairs in their order, leaving out the pairs without a value:
/// how [`KafkaPublisher`] writes a row's headers (`outbox-id`, `outbox-key`, `outbox-seq`, ...), for
/// producers that send messages shaped like the relay's.
pub fn wire_headers<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> OwnedHeaders {
    let pairs = pairs.into_iter();
    let capacity = pairs.size_hint().0;
    pairs.filter_map(|(key, value)| Some((key, value?))).fold(
        OwnedHeaders::new_with_capacity(capacity),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        },
    )
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        if let Some(why) = self.state.recent_auth_failure() {
            return batch.iter().map(|_| Err(auth_failed(&why))).collect();
        }
        let producer = self.current();
        let mut pending = Vec::with_capacity(batch.len());
        // Keys whose message could not even be queued, and how it failed: later messages of the
        // key are not sent so they cannot overtake it on the wire.
        let mut held: HashMap<&str, FailureKind> = HashMap::new();
        for row in batch {
            if let Some(kind) = row.key.as_deref().and_then(|k| held.get(k)) {
                pending.push(Err(PublishError::behind(*kind)));
                continue;
            }
            let span = tracing::debug_span!("publish", outbox.id = %row.id);
            let mut record = FutureRecord::to(&row.topic).payload(&row.payload).headers(headers(row));
            if let Some(k) = &row.key {
                record = record.key(k.as_str());
            }
            loop {
                let sent = {
                    let _entered = span.enter();
                    producer.send_result(record)
                };
                match sent {
                    Ok(delivery) => {
                        pending.push(Ok(delivery));
                        break;
                    }
                    // Back-pressure: the local queue is full; wait for reports to drain it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        let e = classify(&e);
                        if let Some(k) = row.key.as_deref() {
                            held.insert(k, e.kind);
                        }
                        pending.push(Err(e));
                        break;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        let auth = self.state.auth_notify.notified();
        tokio::pin!(auth);
        let mut auth_failure: Option<String> = None;
        for (row, p) in batch.iter().zip(pending) {
            let res = match p {
                Err(e) => Err(e),
                // Authentication failed while waiting: the rest fails at once (the messages may
                // still go out if it later succeeds; the consumer deduplicates).
                Ok(_) if auth_failure.is_some() => Err(auth_failed(auth_failure.as_deref().unwrap_or_default())),
                Ok(fut) => match tokio::select! {
                    r = fut => Some(r),
                    _ = &mut auth => None,
                } {
                    None => {
                        let why = self.state.recent_auth_failure().unwrap_or_else(|| "unknown".into());
                        let e = auth_failed(&why);
                        auth_failure = Some(why);
                        Err(e)
                    }
                    Some(r) => match r {
                        Ok(Ok(d)) => {
                            tracing::trace!(outbox.id = %row.id, partition = d.partition, offset = d.offset, "delivered");
                            Ok(Delivered::new(row.pos).at(d.partition, d.offset))
                        }
                        Ok(Err((e, _))) => Err(classify(&e)),
                        Err(_canceled) => Err(PublishError::retryable("delivery report lost (producer dropped)")),
                    },
                },
            };
            out.push(res);
        }
        self.rebuild_if_fatal(&producer);
        out
    }
}
