//! What a service hands to `enqueue`: the message builder and the checks that keep bad input out of
//! the outbox table (topic names Kafka accepts, payload size, reserved header names).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{Error, Result};

/// Header carrying the message id on the wire.
pub const HEADER_ID: &str = "outbox-id";
/// Header carrying the ordering key on the wire.
pub const HEADER_KEY: &str = "outbox-key";
/// Header carrying the per-key sequence number on the wire.
pub const HEADER_SEQ: &str = "outbox-seq";
/// Header carrying the source id on the wire: which outbox database the message comes from (the
/// id in its `outbox_source` table). Keys and their seqs are numbered per outbox database, so a
/// consumer reading several tells their sequences apart by it.
pub const HEADER_SOURCE: &str = "outbox-source";
/// W3C trace context header, carried from the enqueueing span to the consumer.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header names starting with this prefix are reserved for the framework.
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";

/// Default maximum payload size: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// A message to enqueue in the caller's transaction. Its id is made once, by the constructor: a
/// clone is the same message, to be enqueued once (brokers and consumers take a second copy with
/// the same id for a duplicate and drop it; a batch holding it twice is refused).
///
/// ```
/// use outbox::Message;
/// let msg = Message::json("order.placed.v1", &serde_json::json!({"order": 42}))?
///     .key("order-42")
///     .header("content-type", "application/json");
/// # Ok::<(), outbox::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) id: Uuid,
    pub(crate) topic: String,
    pub(crate) key: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) available_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
}

impl Message {
    /// A message with a raw byte payload. Its id is a fresh UUID v7. With the `opentelemetry`
    /// feature, the current span's trace context is carried in the `traceparent` header.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        let headers = crate::trace::current_traceparent()
            .map(|tp| vec![(HEADER_TRACEPARENT.to_owned(), tp)])
            .unwrap_or_default();
        Message {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            headers,
            available_at: None,
            delay: None,
        }
    }

    /// A message whose payload is `value` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> Result<Self> {
        Ok(Self::new(topic, serde_json::to_vec(value)?))
    }

    /// Sets the ordering key: messages with the same key are delivered in commit order and land on
    /// the same Kafka partition (the key is the Kafka message key).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header. Names starting with `outbox-` are reserved and rejected at enqueue. A
    /// `traceparent` given here replaces the one taken from the current span.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        if name == HEADER_TRACEPARENT {
            self.headers.retain(|(n, _)| n != HEADER_TRACEPARENT);
        }
        self.headers.push((name, value.into()));
        self
    }

    /// Delivers the message no earlier than `delay` after the enqueueing transaction started
    /// (measured by the database clock). For a keyed message, later messages of the key wait too.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.available_at = None;
        self
    }

    /// Delivers the message no earlier than `at`.
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        self.available_at = Some(at);
        self.delay = None;
        self
    }

    /// The message id (UUID v7), also sent as the `outbox-id` header.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The ordering key, if any.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Checks everything that can be checked before touching the database: `max_key` is the
    /// database's longest key in bytes.
    pub(crate) fn validate(&self, max_payload: usize, max_key: usize) -> Result<()> {
        validate_topic(&self.topic)?;
        match self.key.as_deref() {
            Some("") => return Err(Error::EmptyKey),
            Some(k) if k.contains('\0') => return Err(Error::KeyWithNul),
            Some(k) if k.len() > max_key => {
                return Err(Error::KeyTooLong {
                    size: k.len(),
                    max: max_key,
                })
            }
            _ => {}
        }
        if self.payload.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: self.payload.len(),
                max: max_payload,
            });
        }
        if let Some((name, _)) = self
            .headers
            .iter()
            .find(|(n, _)| n.to_ascii_lowercase().starts_with(RESERVED_HEADER_PREFIX))
        {
            return Err(Error::ReservedHeader(name.clone()));
        }
        Ok(())
    }

    /// Headers as stored: NULL when there are none, else a JSON array of pairs.
    pub(crate) fn headers_column(&self) -> Option<String> {
        if self.headers.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&self.headers).expect("string pairs always encode"))
        }
    }

    pub(crate) fn lane(&self, lanes: i32) -> i32 {
        lane_of(self.key.as_deref(), self.id, lanes)
    }

    pub(crate) fn delay_millis(&self) -> i64 {
        self.delay
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// Checks a topic name the way Kafka does: 1..=249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidTopic {
            topic: topic.to_owned(),
            reason,
        })
    };
    if topic.is_empty() {
        return bad("topic is empty");
    }
    if topic.len() > 249 {
        return bad("topic is longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return bad("topic cannot be '.' or '..'");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("topic may only contain [a-zA-Z0-9._-]");
    }
    Ok(())
}

/// The lane of a message: the CRC-32 of its key, or of its id when it has no key, modulo `lanes`.
/// Stable across versions and languages, because rows already written carry it.
pub fn lane_of(key: Option<&str>, id: Uuid, lanes: i32) -> i32 {
    let h = match key {
        Some(k) => crc32fast::hash(k.as_bytes()),
        None => crc32fast::hash(id.as_bytes()),
    };
    (h % lanes as u32) as i32
}

/// What `enqueue` assigned to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Enqueued {
    /// The message id.
    pub id: Uuid,
    /// The per-key sequence number (1, 2, 3, ...), `None` for unkeyed messages.
    pub seq: Option<i64>,
    /// The lane the message belongs to.
    pub lane: i32,
}

/// A committed message as the relay claims it.
///
/// The stores build it from the claimed row; a publisher's tests build one with
/// [`StoredMessage::new`] and the setters:
///
/// ```
/// use outbox::StoredMessage;
/// let id = uuid::Uuid::now_v7();
/// let row = StoredMessage::new(1, id, outbox::lane_of(Some("order-42"), id, outbox::LANES), "orders", "x")
///     .key("order-42", 3)
///     .headers(vec![("content-type".into(), "text/plain".into())]);
/// assert_eq!((row.key.as_deref(), row.seq), (Some("order-42"), Some(3)));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoredMessage {
    /// Insertion position: orders rows of a lane; per key it follows seq. Not a cursor.
    pub pos: i64,
    /// Message id.
    pub id: Uuid,
    /// Lane.
    pub lane: i32,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Per-key sequence number.
    pub seq: Option<i64>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// The message's own headers (the framework adds `outbox-*` on the wire).
    pub headers: Vec<(String, String)>,
    /// Failed publish attempts so far.
    pub attempts: i32,
    /// When the message was enqueued (database clock, start of the enqueueing transaction).
    pub created_at: DateTime<Utc>,
    /// Why the row could not be decoded (e.g. a headers column that is not what `enqueue` writes).
    /// The relay dead-letters such a row instead of publishing it; it never blocks the lane.
    pub corrupt: Option<String>,
    /// The id of the outbox database the row was claimed from (its `outbox_source` table, read by
    /// the claim), sent as the `outbox-source` header. `None` when the table is empty.
    pub source: Option<String>,
}

impl StoredMessage {
    /// The row at `pos` of `lane`: message `id` for `topic` with `payload`. Unkeyed, no headers, no
    /// failed attempts, not corrupt, no source, and `created_at` the Unix epoch until the setters
    /// below say otherwise.
    pub fn new(pos: i64, id: Uuid, lane: i32, topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        StoredMessage {
            pos,
            id,
            lane,
            topic: topic.into(),
            key: None,
            seq: None,
            payload: payload.into(),
            headers: Vec::new(),
            attempts: 0,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            corrupt: None,
            source: None,
        }
    }

    /// Sets the ordering key and the message's sequence number within it (a keyed row always has
    /// both).
    pub fn key(mut self, key: impl Into<String>, seq: i64) -> Self {
        self.key = Some(key.into());
        self.seq = Some(seq);
        self
    }

    /// Sets the message's own headers (the `outbox-*` ones are added on the wire, not here).
    pub fn headers(mut self, headers: Vec<(String, String)>) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the number of failed publish attempts so far.
    pub fn attempts(mut self, attempts: i32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Sets when the message was enqueued.
    pub fn created_at(mut self, created_at: DateTime<Utc>) -> Self {
        self.created_at = created_at;
        self
    }

    /// Sets the id of the outbox database the row comes from (sent as the `outbox-source` header).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }
}

/// How many of `msgs` each key has, in key order: the seqs each key takes in one batch (counters
/// taken in key order keep two batches from deadlocking).
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn key_counts(msgs: &[Message]) -> std::collections::BTreeMap<&str, i64> {
    let mut counts = std::collections::BTreeMap::new();
    for k in msgs.iter().filter_map(|m| m.key.as_deref()) {
        *counts.entry(k).or_default() += 1;
    }
    counts
}

/// A claimed row as a backend reads it: `K` is how that database gives text (topic, key, headers)
/// and `T` times. [`ClaimRow::decode`] is the one place a row becomes a [`StoredMessage`]; what
/// cannot be decoded marks the row corrupt (the relay dead-letters it) instead of failing the whole
/// claim.
#[derive(Debug, sqlx::FromRow)]
#[allow(dead_code)] // read by the backends compiled in
pub(crate) struct ClaimRow<K, T> {
    pub(crate) pos: i64,
    pub(crate) id: Uuid,
    pub(crate) lane: i32,
    pub(crate) topic: K,
    pub(crate) key: Option<K>,
    pub(crate) seq: Option<i64>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Option<K>,
    pub(crate) attempts: i32,
    pub(crate) created_at: T,
    pub(crate) source: Option<String>,
    /// What the database itself found wrong with the row's values, `None` when nothing (only
    /// SQLite, whose columns keep whatever type a writer gave them, reads one).
    #[sqlx(default)]
    pub(crate) bad: Option<String>,
}

#[allow(dead_code)] // used by the backends compiled in
impl<K, T> ClaimRow<K, T> {
    /// Converts the row; `text` and `time` turn the database's text and time into ours.
    pub(crate) fn decode(
        self,
        text: impl Fn(K) -> std::result::Result<String, String>,
        time: impl FnOnce(T) -> std::result::Result<DateTime<Utc>, String>,
    ) -> StoredMessage {
        let mut corrupt: Vec<String> = self
            .bad
            .map(|b| b.trim_end_matches("; ").to_owned())
            .into_iter()
            .collect();
        let headers = match self.headers.map(&text).transpose().and_then(|h| {
            h.as_deref()
                .map(serde_json::from_str::<Vec<(String, String)>>)
                .transpose()
                .map_err(|e| e.to_string())
        }) {
            Ok(h) => h.unwrap_or_default(),
            Err(e) => {
                corrupt.push(format!("headers column: {e}"));
                Vec::new()
            }
        };
        let topic = text(self.topic).unwrap_or_else(|e| {
            corrupt.push(format!("topic column: {e}"));
            String::new()
        });
        let key = self.key.map(&text).transpose().unwrap_or_else(|e| {
            corrupt.push(format!("key column: {e}"));
            None
        });
        let created_at = time(self.created_at).unwrap_or_else(|e| {
            corrupt.push(format!("created_at column: {e}"));
            DateTime::<Utc>::UNIX_EPOCH
        });
        let corrupt = (!corrupt.is_empty()).then(|| {
            let err = Error::CorruptRow {
                id: self.id,
                reason: corrupt.join("; "),
            };
            tracing::error!(outbox.id = %self.id, error = %err, "corrupt outbox row");
            err.to_string()
        });
        StoredMessage {
            pos: self.pos,
            id: self.id,
            lane: self.lane,
            topic,
            key,
            seq: self.seq,
            payload: self.payload,
            headers,
            attempts: self.attempts,
            created_at,
            corrupt,
            source: self.source,
        }
    }
}

#[cfg(test)]
mod tests;
