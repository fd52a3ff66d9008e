//! `NatsPublisher`: the relay's [`Publisher`] on JetStream. A message counts as delivered only when
//! its stream acknowledged it; `Nats-Msg-Id` is the outbox id, so a re-send is dropped by the stream
//! inside its duplicate window.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{
    GetStreamByNameError, GetStreamByNameErrorKind, PublishError as JsPublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_trait::async_trait;
use futures::future::join_all;
use outbox::{
    Delivered, FailureKind, PublishError, Publisher, StoredMessage, HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE,
};
use tracing::Instrument;

use crate::{subject_for, NatsConfig, NatsError};
use outbox::redact::redact_url;

/// Room taken by the protocol around a message's headers (`NATS/1.0\r\n`, separators).
const HEADER_OVERHEAD: usize = 64;

/// How long a publish answered "no responders" is sent again before it asks which stream takes
/// the subject (see [`no_responders`]).
const NO_RESPONDERS_GRACE: Duration = Duration::from_secs(2);
/// The wait between those sends.
const NO_RESPONDERS_WAIT: Duration = Duration::from_millis(250);

/// Publishes outbox rows to JetStream. One connection, shared by all lanes of a relay; it reconnects
/// by itself.
///
/// Per key, a message is sent only once the stream acknowledged the message before it in the
/// batch: a stream stores in arrival order, and a message sent after a failed one (for instance
/// the first one lost with a dropped connection, the second sent on the new connection) would be
/// stored before it. So the messages of a batch go out as one chain per key, all chains (and all
/// unkeyed messages) at once: a batch of many keys is pipelined, a batch of one key takes one round
/// trip per message. When a message fails, the later messages of its key in the batch are not sent
/// and come back [`HeldBack`](outbox::FailureKind::HeldBack).
pub struct NatsPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").field("cfg", &self.cfg).finish()
    }
}

impl NatsPublisher {
    /// Connects to the servers of `cfg.url`. A server that cannot be reached now is not an error:
    /// the client keeps trying in the background and publishes report
    /// [`Unavailable`](outbox::FailureKind::Unavailable) until it is connected. A URL that cannot
    /// be parsed is.
    pub async fn connect(cfg: NatsConfig) -> Result<Self, NatsError> {
        let client = cfg.client(&cfg.connection_name).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout)
            .build(client.clone());
        tracing::info!(url = %redact_url(&cfg.url), "NATS publisher started");
        Ok(NatsPublisher { client, js, cfg })
    }

    /// The NATS client (for streams, readers, or closing it).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The settings.
    pub fn config(&self) -> &NatsConfig {
        &self.cfg
    }

    /// Everything that can fail before the message is sent: its subject, its headers, its size.
    fn prepare(&self, row: &StoredMessage) -> Result<(String, PublishMessage), PublishError> {
        let subject =
            subject_for(&self.cfg.subject_prefix, &row.topic, row.key.as_deref()).map_err(PublishError::permanent)?;
        let headers = headers(row)?;
        let size = row.payload.len()
            + subject.len()
            + HEADER_OVERHEAD
            + headers
                .iter()
                .map(|(k, vs)| {
                    vs.iter()
                        .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                        .sum::<usize>()
                })
                .sum::<usize>();
        // The server closes a connection that sends more than its max_payload: check here, so one
        // message too large fails alone (permanently) instead of breaking every publish in flight.
        let max = self.client.server_info().max_payload;
        if max > 0 && size > max {
            return Err(PublishError::permanent(format!(
                "message too large: {size} bytes with subject and headers, the server's max_payload is {max}"
            )));
        }
        let msg = PublishMessage::build()
            .payload(row.payload.clone().into())
            .headers(headers);
        Ok((subject, msg))
    }

    /// Sends one message and waits for its ack. "No responders" is tried again for
    /// [`NO_RESPONDERS_GRACE`], then decided by which stream takes the subject ([`no_responders`]):
    /// a clustered stream has no responder while it elects a leader (NATS ADR-22). The message id
    /// stays the same, so the stream keeps one copy whatever reached it.
    async fn publish_one(&self, row: &StoredMessage) -> Result<Delivered, PublishError> {
        let started = tokio::time::Instant::now();
        let ack = loop {
            let (subject, msg) = self.prepare(row)?;
            let res = match self.js.send_publish(subject, msg).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match res {
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound && started.elapsed() < NO_RESPONDERS_GRACE => {
                    tokio::time::sleep(NO_RESPONDERS_WAIT).await;
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    let (subject, _) = self.prepare(row)?;
                    return Err(no_responders(&e, self.js.stream_by_subject(subject).await));
                }
                res => break res.map_err(|e| classify(&e))?,
            }
        };
        if ack.duplicate {
            metrics::counter!("outbox_nats_duplicate_acks_total").increment(1);
            tracing::debug!(outbox.id = %row.id, stream = %ack.stream, seq = ack.sequence, "re-send dropped by the stream's duplicate window");
        }
        Ok(Delivered::new(row.pos).at(0, i64::try_from(ack.sequence).unwrap_or(i64::MAX)))
    }

    /// Sends the messages of one key (or one unkeyed message) in order, each after the previous
    /// one's ack; after a failure the rest are held back.
    async fn publish_chain(
        &self,
        chain: Vec<(usize, &StoredMessage)>,
    ) -> Vec<(usize, Result<Delivered, PublishError>)> {
        let mut out = Vec::with_capacity(chain.len());
        let mut failed: Option<FailureKind> = None;
        for (i, row) in chain {
            match failed {
                // The rest of the key is not sent (reported Unavailable when the server could not
                // take anything: the relay backs off, nothing counts as an attempt).
                Some(kind) => out.push((i, Err(PublishError::behind(kind)))),
                None => {
                    let res = self
                        .publish_one(row)
                        .instrument(tracing::debug_span!("publish", outbox.id = %row.id))
                        .await;
                    failed = res.as_ref().err().map(|e| e.kind);
                    out.push((i, res));
                }
            }
        }
        out
    }
}

/// The headers on the wire: the user's, then `outbox-id`, `outbox-key`, `outbox-seq`,
/// `outbox-source` (the names and values the other publishers send) and `Nats-Msg-Id` (the id).
/// A header NATS cannot carry (a name with `:` or a space, a value with a line break) or one of
/// JetStream's own (`Nats-*`) is a permanent failure.
fn headers(row: &StoredMessage) -> Result<HeaderMap, PublishError> {
    let mut h = HeaderMap::new();
    let mut add = |name: &str, value: &str| -> Result<(), PublishError> {
        let n = HeaderName::from_str(name)
            .map_err(|_| PublishError::permanent(format!("header name {name:?} cannot be sent over NATS")))?;
        let v = HeaderValue::from_str(value).map_err(|_| {
            PublishError::permanent(format!(
                "the value of header {name:?} cannot be sent over NATS (a line break)"
            ))
        })?;
        h.append(n, v);
        Ok(())
    };
    for (k, v) in &row.headers {
        if k.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("nats-")) {
            return Err(PublishError::permanent(format!(
                "header {k:?} is JetStream's own: the stream would act on it (a rollup purges the key's earlier \
                 messages, an expected sequence refuses the message)"
            )));
        }
        add(k, v)?;
    }
    add(HEADER_ID, &row.id.to_string())?;
    if let Some(k) = &row.key {
        add(HEADER_KEY, k)?;
    }
    if let Some(s) = row.seq {
        add(HEADER_SEQ, &s.to_string())?;
    }
    if let Some(s) = &row.source {
        add(HEADER_SOURCE, s)?;
    }
    h.insert(NATS_MESSAGE_ID, row.id.to_string().as_str());
    Ok(h)
}

/// A publish with no responders past [`NO_RESPONDERS_GRACE`], by which stream takes its subject
/// (`taken`, asked of JetStream's API, which the meta leader answers, not the stream's). A stream
/// that takes it and answers no publish is electing its leader, 4 to 9 s after its leader's node
/// went away (NATS's Raft election timeout): unavailable, the relay backs off and counts no
/// attempt (it was permanent, and the message dead-lettered). No stream takes it: permanent, as
/// a Kafka topic that does not exist. The question unanswered (the meta leader is being elected
/// too): unavailable.
fn no_responders(e: &JsPublishError, taken: Result<String, GetStreamByNameError>) -> PublishError {
    match taken {
        Ok(stream) => PublishError::unavailable(format!(
            "{e}: stream {stream} takes the subject but answers no publish (electing its leader)"
        )),
        Err(q) if q.kind() == GetStreamByNameErrorKind::NotFound => classify(e),
        Err(q) => PublishError::unavailable(format!("{e}; which stream takes the subject is not known either: {q}")),
    }
}

/// Decides retry, back-off or dead letter from a failed JetStream publish.
pub fn classify(e: &JsPublishError) -> PublishError {
    match e.kind() {
        // No stream takes the subject: publishing again will not help until someone creates one.
        PublishErrorKind::StreamNotFound => {
            PublishError::permanent(format!("{e} (no stream takes this subject: no responders)"))
        }
        PublishErrorKind::TimedOut => PublishError::unavailable(format!(
            "{e} (possibly persisted; sent again with the same Nats-Msg-Id, the stream drops it within its duplicate window)"
        )),
        PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
            PublishError::unavailable(format!("{e} (connection lost; possibly persisted)"))
        }
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => PublishError::retryable(e.to_string()),
        _ => {
            let api = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api {
                Some(api) => classify_api(api, e),
                None => PublishError::unavailable(format!("{e} (the client could not send it)")),
            }
        }
    }
}

fn classify_api(api: &jetstream::Error, e: &JsPublishError) -> PublishError {
    match api.error_code() {
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => PublishError::permanent(format!("message too large: {e}")),
        ErrorCode::STREAM_NOT_FOUND | ErrorCode::NO_ACCOUNT => PublishError::permanent(e.to_string()),
        // Out of storage, stream limits with discard=new, JetStream not ready or without a
        // leader: the server cannot take any message now.
        ErrorCode::STREAM_STORE_FAILED
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED
        | ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::JETSTREAM_NOT_ENABLED
        | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        | ErrorCode::CLUSTER_NOT_AVAILABLE
        | ErrorCode::CLUSTER_NOT_LEADER => PublishError::unavailable(e.to_string()),
        _ if api.code() == 503 => PublishError::unavailable(e.to_string()),
        _ => PublishError::retryable(e.to_string()),
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            let why = format!(
                "not connected to nats-server at {}; reconnecting",
                redact_url(&self.cfg.url)
            );
            return batch
                .iter()
                .map(|_| Err(PublishError::unavailable(why.clone())))
                .collect();
        }
        // One chain per key, in batch order; an unkeyed message is a chain of its own.
        let mut chains: Vec<Vec<(usize, &StoredMessage)>> = Vec::new();
        let mut chain_of: HashMap<&str, usize> = HashMap::new();
        for (i, row) in batch.iter().enumerate() {
            match row.key.as_deref() {
                Some(k) => {
                    let c = *chain_of.entry(k).or_insert_with(|| {
                        chains.push(Vec::new());
                        chains.len() - 1
                    });
                    chains[c].push((i, row));
                }
                None => chains.push(vec![(i, row)]),
            }
        }
        let mut out: Vec<Option<Result<Delivered, PublishError>>> = batch.iter().map(|_| None).collect();
        for done in join_all(chains.into_iter().map(|c| self.publish_chain(c))).await {
            for (i, res) in done {
                out[i] = Some(res);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PublishError::retryable("no outcome"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let kind = |k| classify(&JsPublishError::new(k)).kind;
        assert_eq!(kind(PublishErrorKind::StreamNotFound), FailureKind::Permanent);
        assert_eq!(kind(PublishErrorKind::TimedOut), FailureKind::Unavailable);
        assert_eq!(kind(PublishErrorKind::BrokenPipe), FailureKind::Unavailable);
        assert_eq!(kind(PublishErrorKind::Other), FailureKind::Unavailable);
        assert_eq!(kind(PublishErrorKind::WrongLastSequence), FailureKind::Retryable);
    }

    /// No responders past the grace: permanent only when no stream takes the subject.
    #[test]
    fn no_responders_is_permanent_only_without_a_stream_for_the_subject() {
        let e = JsPublishError::new(PublishErrorKind::StreamNotFound);
        let kind = |taken| no_responders(&e, taken).kind;
        assert_eq!(
            kind(Ok("ORDERS".into())),
            FailureKind::Unavailable,
            "a stream electing its leader"
        );
        let none = GetStreamByNameError::new(GetStreamByNameErrorKind::NotFound);
        assert_eq!(kind(Err(none)), FailureKind::Permanent, "no stream");
        let unanswered = GetStreamByNameError::new(GetStreamByNameErrorKind::Request);
        assert_eq!(kind(Err(unanswered)), FailureKind::Unavailable, "no answer");
    }

    #[test]
    fn headers_carry_the_outbox_names_and_the_msg_id() {
        let id = uuid::Uuid::now_v7();
        let row = StoredMessage::new(1, id, 0, "t", b"x".to_vec())
            .key("k", 3)
            .headers(vec![("traceparent".into(), "00-abc".into())])
            .source("src");
        let h = headers(&row).unwrap();
        let get = |n: &str| h.get(HeaderName::from_str(n).unwrap()).map(|v| v.as_str().to_owned());
        assert_eq!(get("Nats-Msg-Id"), Some(id.to_string()));
        assert_eq!(get("outbox-id"), Some(id.to_string()));
        assert_eq!(get("outbox-key").as_deref(), Some("k"));
        assert_eq!(get("outbox-seq").as_deref(), Some("3"));
        assert_eq!(get("outbox-source").as_deref(), Some("src"));
        assert_eq!(get("traceparent").as_deref(), Some("00-abc"));
        let mut bad = row.clone();
        bad.headers = vec![("a b".into(), "v".into())];
        assert_eq!(headers(&bad).unwrap_err().kind, FailureKind::Permanent);
        bad.headers = vec![("a".into(), "v\r\nx".into())];
        assert_eq!(headers(&bad).unwrap_err().kind, FailureKind::Permanent);
        // JetStream's own headers would have the stream act on the message (`Nats-Rollup: sub`
        // purges the key's earlier messages, consumed or not): a message of the service's may not
        // carry them.
        for name in ["Nats-Rollup", "nats-ttl", "Nats-Expected-Stream", "Nats-Msg-Id"] {
            bad.headers = vec![(name.into(), "sub".into())];
            let err = headers(&bad).unwrap_err();
            assert_eq!(err.kind, FailureKind::Permanent, "{name}");
            assert!(err.message.contains(name), "{err:?}");
        }
    }
}
