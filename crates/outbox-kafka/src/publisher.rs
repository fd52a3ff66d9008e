//! `KafkaPublisher`: the relay's [`Publisher`] on rdkafka. Idempotent producer with `acks=all`; a
//! message counts as delivered only when its delivery report says so.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::{Delivered, PublishError, Publisher, StoredMessage, HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Settings the publisher applies unless the configuration sets them: the broker must have every
/// in-sync replica's copy before we mark a row, and producer retries must not reorder or duplicate.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // Same partition for the same key as the Java client.
    ("partitioner", "murmur2_random"),
    // A batch waits at most this long for its reports; then the rows are retried (possibly
    // persisted: the consumer deduplicates).
    ("message.timeout.ms", "30000"),
];

/// librdkafka's other names for settings the publisher cares about: (main name, alias).
const ALIASES: &[(&str, &str)] = &[
    ("acks", "request.required.acks"),
    ("message.timeout.ms", "delivery.timeout.ms"),
    ("max.in.flight.requests.per.connection", "max.in.flight"),
];

/// Configuration keys whose values are never printed.
const SECRET_KEYS: &[&str] = &["ssl_key", "ssl.key.pem", "sasl.oauthbearer.config"];

/// Parts of a key that mark its value as secret: passwords, client secrets, private keys and
/// their passphrases (e.g. `sasl.oauthbearer.assertion.private.key.passphrase`,
/// `sasl.oauthbearer.assertion.private.key.pem`), tokens.
const SECRET_PARTS: &[&str] = &["password", "secret", "passphrase", "private.key", "token", "credential"];

/// True for librdkafka settings whose value must never be logged.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.contains(&key.as_str()) || SECRET_PARTS.iter().any(|p| key.contains(p))
}

/// How long after librdkafka reported an authentication (SASL or TLS) failure a publish fails at once instead of
/// waiting for its delivery reports (librdkafka retries the connection meanwhile).
const AUTH_FAILURE_HOLDS: Duration = Duration::from_secs(5);

/// What librdkafka reported about the broker connection, shared with the producer's context.
#[derive(Default)]
struct BrokerState {
    /// The last authentication failure: when, and librdkafka's reason (never holds a secret).
    auth_failed: Mutex<Option<(Instant, String)>>,
    /// Wakes publishes waiting for reports when authentication fails.
    auth_notify: tokio::sync::Notify,
}

impl BrokerState {
    fn recent_auth_failure(&self) -> Option<String> {
        let last = self.auth_failed.lock().expect("broker state lock");
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < AUTH_FAILURE_HOLDS)
            .map(|(_, why)| why.clone())
    }
}

/// The producer's context: librdkafka's global errors, logged; an authentication failure is also
/// recorded so publishes fail at once (as `Unavailable`) instead of timing out.
#[derive(Clone)]
struct Context(Arc<BrokerState>);

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
type OutboxProducer = FutureProducer<Context>;

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

/// The settings with secret values replaced by `***`.
pub fn redacted(settings: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    settings
        .iter()
        .map(|(k, v)| (k.clone(), if is_secret(k) { "***".into() } else { v.clone() }))
        .collect()
}

impl KafkaPublisher {
    /// A publisher from librdkafka settings (`bootstrap.servers`, TLS, SASL...), passed through
    /// unchanged; [`PRODUCER_DEFAULTS`] fill in what is not set.
    pub fn new<K, V>(settings: impl IntoIterator<Item = (K, V)>) -> Result<Self, KafkaError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut map: BTreeMap<String, String> = settings.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        for (k, v) in PRODUCER_DEFAULTS {
            // A setting given under its alias is not filled in under its main name.
            let given = ALIASES
                .iter()
                .any(|(main, alias)| main == k && map.contains_key(*alias));
            if !given {
                map.entry((*k).to_owned()).or_insert_with(|| (*v).to_owned());
            }
        }
        check_delivery_invariants(&map)?;
        fill_propagation(&mut map);
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
    /// The failed rows come back as retryable and are re-sent in order by the relay.
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

/// librdkafka's configuration errors name the value they refused: never a secret's.
fn redact_error(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(res, desc, key, value) if is_secret(&key) => {
            let desc = desc.replace(&value, "***");
            KafkaError::ClientConfig(res, desc, key, "***".into())
        }
        e => e,
    }
}

/// Refuses settings under which a delivery report no longer means "every in-sync replica has it"
/// or producer retries may reorder a key: the relay marks a row on its report, so these would turn
/// into lost or reordered messages. The error names the setting.
fn check_delivery_invariants(settings: &BTreeMap<String, String>) -> Result<(), KafkaError> {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| settings.get(*k).map(|v| ((*k).to_owned(), v.trim().to_owned())))
    };
    let refuse = |key: String, value: String, why: &str| {
        Err(KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            format!("refused: {why}"),
            key,
            value,
        ))
    };
    if let Some((k, v)) = get(&["acks", "request.required.acks"]) {
        if !matches!(v.as_str(), "all" | "-1") {
            return refuse(
                k,
                v,
                "the relay marks a row only once every in-sync replica has it; set acks=all",
            );
        }
    }
    let idempotent = get(&["enable.idempotence"]).is_some_and(|(_, v)| v == "true");
    if !idempotent {
        let in_flight = get(&["max.in.flight.requests.per.connection", "max.in.flight"]);
        if in_flight.as_ref().is_none_or(|(_, v)| v != "1") {
            let (k, v) = in_flight.unwrap_or((
                "max.in.flight.requests.per.connection".into(),
                "(default 1000000)".into(),
            ));
            return refuse(
                k,
                v,
                "without enable.idempotence=true a retried request can overtake a later one of the same key; \
                 keep enable.idempotence=true or set max.in.flight.requests.per.connection=1",
            );
        }
    }
    if let Some((k, v)) = get(&["message.timeout.ms", "delivery.timeout.ms"]) {
        if v.parse::<u64>().map_or(true, |ms| ms == 0) {
            return refuse(
                k,
                v,
                "a batch must get its delivery reports in bounded time; use a positive timeout",
            );
        }
    }
    Ok(())
}

/// librdkafka's name for how long a topic the cluster does not report is taken for one still being
/// created: only after it does librdkafka fail the topic's messages as unknown.
const PROPAGATION: &str = "topic.metadata.propagation.max.ms";

/// Unless set, [`PROPAGATION`] is a third of the delivery timeout, at most 10 s. librdkafka's
/// default (30 s) is as long as our default `message.timeout.ms`, so a message to a topic that does
/// not exist timed out instead ("possibly persisted": `Unavailable`, backed off and sent again for
/// ever, never dead-lettered) and the lane stalled for the whole timeout on each try. A third leaves
/// the unknown-topic failure (`Permanent`) time to come first.
fn fill_propagation(settings: &mut BTreeMap<String, String>) {
    if settings.contains_key(PROPAGATION) {
        return;
    }
    let timeout_ms = ["message.timeout.ms", "delivery.timeout.ms"]
        .iter()
        .find_map(|k| settings.get(*k))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(30_000);
    settings.insert(PROPAGATION.to_owned(), (timeout_ms / 3).clamp(1, 10_000).to_string());
}

fn build(settings: &BTreeMap<String, String>, state: &Arc<BrokerState>) -> Result<OutboxProducer, KafkaError> {
    let mut cfg = ClientConfig::new();
    for (k, v) in settings {
        cfg.set(k, v);
    }
    cfg.create_with_context(Context(state.clone()))
}

fn auth_failed(why: &str) -> PublishError {
    PublishError::unavailable(format!("broker authentication failed: {why}"))
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
        _ => PublishError::retryable(e.to_string()),
    }
}

fn headers(row: &StoredMessage) -> OwnedHeaders {
    let id = row.id.to_string();
    let seq = row.seq.map(|s| s.to_string());
    let mut h = OwnedHeaders::new_with_capacity(4 + row.headers.len()).insert(Header {
        key: HEADER_ID,
        value: Some(id.as_bytes()),
    });
    if let Some(k) = &row.key {
        h = h.insert(Header {
            key: HEADER_KEY,
            value: Some(k.as_bytes()),
        });
    }
    if let Some(s) = &seq {
        h = h.insert(Header {
            key: HEADER_SEQ,
            value: Some(s.as_bytes()),
        });
    }
    if let Some(s) = &row.source {
        h = h.insert(Header {
            key: HEADER_SOURCE,
            value: Some(s.as_bytes()),
        });
    }
    for (k, v) in &row.headers {
        h = h.insert(Header {
            key: k.as_str(),
            value: Some(v.as_bytes()),
        });
    }
    h
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        if let Some(why) = self.state.recent_auth_failure() {
            return batch.iter().map(|_| Err(auth_failed(&why))).collect();
        }
        let producer = self.current();
        let mut pending = Vec::with_capacity(batch.len());
        // Keys whose message could not even be queued: later messages of the key are held back so
        // they cannot overtake it on the wire.
        let mut held: HashSet<&str> = HashSet::new();
        for row in batch {
            if let Some(k) = row.key.as_deref() {
                if held.contains(k) {
                    pending.push(Err(PublishError::held_back(
                        "held back: an earlier message of its key failed",
                    )));
                    continue;
                }
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
                        if let Some(k) = row.key.as_deref() {
                            held.insert(k);
                        }
                        pending.push(Err(classify(&e)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let mut m = BTreeMap::new();
        m.insert("sasl.password".to_string(), "hunter2".to_string());
        m.insert("bootstrap.servers".to_string(), "127.0.0.1:9092".to_string());
        let r = redacted(&m);
        assert_eq!(r["sasl.password"], "***");
        assert_eq!(r["bootstrap.servers"], "127.0.0.1:9092");
    }

    #[test]
    fn classification() {
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&big).kind, outbox::FailureKind::Permanent);
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(classify(&timeout).kind, outbox::FailureKind::Unavailable);
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(classify(&down).kind, outbox::FailureKind::Unavailable);
        let isr = KafkaError::MessageProduction(RDKafkaErrorCode::NotEnoughReplicas);
        assert_eq!(classify(&isr).kind, outbox::FailureKind::Unavailable);
        let other = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidMessage);
        assert_eq!(classify(&other).kind, outbox::FailureKind::Retryable);
    }

    #[test]
    fn defaults_fill_in_but_never_override() {
        let p = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("partitioner", "consistent")]).unwrap();
        let s = p.settings();
        assert_eq!(s["partitioner"], "consistent");
        assert_eq!(s["acks"], "all");
        assert_eq!(s["enable.idempotence"], "true");
        // An unknown topic fails (permanent) before the delivery timeout (unavailable).
        assert_eq!(s["topic.metadata.propagation.max.ms"], "10000");
        let p = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("message.timeout.ms", "6000")]).unwrap();
        assert_eq!(p.settings()["topic.metadata.propagation.max.ms"], "2000");
        let p = KafkaPublisher::new([
            ("bootstrap.servers", "127.0.0.1:1"),
            ("topic.metadata.propagation.max.ms", "500"),
        ])
        .unwrap();
        assert_eq!(p.settings()["topic.metadata.propagation.max.ms"], "500");
        // librdkafka itself rejects a setting that breaks idempotence, with a clear message.
        let err = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("acks", "1")]).unwrap_err();
        assert!(err.to_string().contains("acks"), "{err}");
        let err = KafkaPublisher::new([("no.such.setting", "1")]).unwrap_err();
        assert!(err.to_string().contains("no.such.setting"), "{err}");
    }

    #[test]
    fn settings_that_break_confirm_before_mark_or_key_order_are_refused() {
        let refused = |extra: &[(&str, &str)], names: &str| {
            let mut settings = vec![("bootstrap.servers", "127.0.0.1:1")];
            settings.extend_from_slice(extra);
            let err = KafkaPublisher::new(settings).expect_err("refused");
            assert!(err.to_string().contains(names), "{extra:?}: {err}");
        };
        refused(&[("acks", "0"), ("enable.idempotence", "false")], "acks");
        refused(&[("acks", "1"), ("enable.idempotence", "false")], "acks");
        refused(
            &[("request.required.acks", "1"), ("enable.idempotence", "false")],
            "request.required.acks",
        );
        refused(
            &[("enable.idempotence", "false")],
            "max.in.flight.requests.per.connection",
        );
        refused(
            &[
                ("enable.idempotence", "false"),
                ("max.in.flight.requests.per.connection", "5"),
            ],
            "max.in.flight.requests.per.connection",
        );
        refused(&[("message.timeout.ms", "0")], "message.timeout.ms");
        // What keeps the invariants is accepted.
        KafkaPublisher::new([
            ("bootstrap.servers", "127.0.0.1:1"),
            ("enable.idempotence", "false"),
            ("max.in.flight.requests.per.connection", "1"),
            ("acks", "-1"),
        ])
        .unwrap();
    }
}
