//! A delivered message as the inbox sees it, borrowed from the consumer's buffer, and the parsing of
//! the framework headers (`outbox-id`, `outbox-key`, `outbox-seq`, `outbox-source`) that identify it.

use outbox::{HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE};
use uuid::Uuid;

use crate::InboxError;

/// The longest `outbox-source` the inbox accepts, in bytes (the column is that wide on MySQL).
pub const MAX_SOURCE_LEN: usize = 255;

/// One delivered message. Build it with [`Incoming::from_headers`] from what the broker delivered, or
/// with [`Incoming::new`] when the id comes from elsewhere.
///
/// The message is *keyed* when it has both a key and a seq: then duplicates are recognised by seq
/// per (source, key), forever. Otherwise by id, within the inbox's retention window.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Incoming<'a> {
    /// The message id (`outbox-id`).
    pub id: Uuid,
    /// The ordering key (`outbox-key`), if any.
    pub key: Option<&'a str>,
    /// The per-key sequence number (`outbox-seq`): 1, 2, 3, ... without holes, per key of one
    /// outbox database.
    pub seq: Option<i64>,
    /// The id of the outbox database the message comes from (`outbox-source`), if any. Keys and
    /// seqs are numbered per outbox database: the inbox keeps the records of each source apart. A
    /// message without one (sent by a relay that predates the header) belongs to the default
    /// source. At most [`MAX_SOURCE_LEN`] bytes.
    pub source: Option<&'a str>,
    /// The topic it was delivered on.
    pub topic: &'a str,
    /// The payload bytes (empty for a message without payload).
    pub payload: &'a [u8],
    /// All headers as delivered, the `outbox-*` ones included, in order.
    pub headers: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Incoming<'a> {
    /// An unkeyed message with no headers.
    pub fn new(id: Uuid, topic: &'a str, payload: &'a [u8]) -> Self {
        Incoming {
            id,
            key: None,
            seq: None,
            source: None,
            topic,
            payload,
            headers: Vec::new(),
        }
    }

    /// Sets the key and its sequence number, making the message keyed.
    pub fn keyed(mut self, key: &'a str, seq: i64) -> Self {
        self.key = Some(key);
        self.seq = Some(seq);
        self
    }

    /// Sets the source: the id of the outbox database the message comes from (at most
    /// [`MAX_SOURCE_LEN`] bytes; an empty one is the default source, as if none was set).
    pub fn source(mut self, source: &'a str) -> Self {
        self.source = (!source.is_empty()).then_some(source);
        self
    }

    /// Appends a header.
    pub fn header(mut self, name: &'a str, value: &'a [u8]) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Parses a delivered message. `headers` are (name, value) pairs as the broker delivered them
    /// (with rdkafka: `h.key, h.value.unwrap_or_default()`); values of the framework headers are
    /// UTF-8 text. `outbox-id` is required; `outbox-key`, `outbox-seq` and `outbox-source` are
    /// optional (an empty `outbox-source` counts as none), and when several headers share a name
    /// the first one counts.
    ///
    /// A missing or malformed `outbox-id`, a key that is empty or not UTF-8, a seq that is not a
    /// positive integer, or a source that is not UTF-8 or longer than [`MAX_SOURCE_LEN`] bytes is
    /// an error that no retry fixes (`is_retryable()` is false).
    ///
    /// ```
    /// use outbox_inbox::Incoming;
    /// let headers = [("outbox-id", &b"0191d3c4-9a1e-7c2b-8d4e-5f6a7b8c9d0e"[..]), ("outbox-key", b"order-42"), ("outbox-seq", b"3")];
    /// let msg = Incoming::from_headers("orders", b"{}", headers)?;
    /// assert_eq!((msg.key, msg.seq), (Some("order-42"), Some(3)));
    /// # Ok::<(), outbox_inbox::InboxError>(())
    /// ```
    pub fn from_headers<I>(topic: &'a str, payload: &'a [u8], headers: I) -> Result<Self, InboxError>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let headers: Vec<(&'a str, &'a [u8])> = headers.into_iter().collect();
        let find = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);

        let id = find(HEADER_ID).ok_or(InboxError::MissingHeader(HEADER_ID))?;
        let id = Uuid::try_parse(text(HEADER_ID, id)?.trim()).map_err(|e| malformed(HEADER_ID, e.to_string()))?;
        let key = match find(HEADER_KEY) {
            None => None,
            Some(v) => match text(HEADER_KEY, v)? {
                "" => return Err(malformed(HEADER_KEY, "the key is empty".into())),
                k => Some(k),
            },
        };
        let seq = match find(HEADER_SEQ) {
            None => None,
            Some(v) => match text(HEADER_SEQ, v)?.trim().parse::<i64>() {
                Ok(s) => {
                    check_seq(s).map_err(|reason| malformed(HEADER_SEQ, reason))?;
                    Some(s)
                }
                Err(e) => return Err(malformed(HEADER_SEQ, e.to_string())),
            },
        };
        let source = match find(HEADER_SOURCE) {
            None => None,
            Some(v) => match text(HEADER_SOURCE, v)? {
                "" => None,
                s if s.len() > MAX_SOURCE_LEN => {
                    return Err(malformed(
                        HEADER_SOURCE,
                        format!("{} bytes, more than {MAX_SOURCE_LEN}", s.len()),
                    ))
                }
                s => Some(s),
            },
        };
        Ok(Incoming {
            id,
            key,
            seq,
            source,
            topic,
            payload,
            headers,
        })
    }

    /// The value of the first header called `name`.
    pub fn header_value(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// Key and seq when the message is keyed (both present).
    pub(crate) fn key_seq(&self) -> Option<(&'a str, i64)> {
        self.key.zip(self.seq)
    }

    /// The source the inbox scopes the message's records by: '' for the default source.
    pub(crate) fn scope(&self) -> &'a str {
        self.source.unwrap_or("")
    }
}

fn text<'v>(name: &'static str, value: &'v [u8]) -> Result<&'v str, InboxError> {
    std::str::from_utf8(value).map_err(|e| malformed(name, format!("not UTF-8: {e}")))
}

fn malformed(name: &'static str, reason: String) -> InboxError {
    InboxError::MalformedHeader { name, reason }
}

/// Checks a keyed message's seq: from 1 to `i64::MAX - 1` (the inbox counts one past a key's
/// highest seq, which must fit the databases' 64-bit integers).
pub(crate) fn check_seq(seq: i64) -> Result<(), String> {
    if (1..i64::MAX).contains(&seq) {
        Ok(())
    } else {
        Err(format!("{seq} is not a sequence number from 1 to {}", i64::MAX - 1))
    }
}
