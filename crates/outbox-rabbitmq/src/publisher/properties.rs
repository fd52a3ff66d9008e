//! The AMQP properties a row is published with.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use outbox::{StoredMessage, HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE};

/// AMQP delivery mode of a message written to disk by durable queues.
const PERSISTENT: u8 = 2;

/// The AMQP headers of a row: the `outbox-*` ones, then the row's own.
fn headers(row: &StoredMessage) -> FieldTable {
    let mut t = FieldTable::default();
    let mut put = |k: &str, v: String| t.insert(ShortString::from(k), AMQPValue::LongString(LongString::from(v)));
    put(HEADER_ID, row.id.to_string());
    if let Some(k) = &row.key {
        put(HEADER_KEY, k.clone());
    }
    if let Some(s) = row.seq {
        put(HEADER_SEQ, s.to_string());
    }
    if let Some(s) = &row.source {
        put(HEADER_SOURCE, s.clone());
    }
    for (k, v) in &row.headers {
        put(k, v.clone());
    }
    t
}

/// Persistent, with `message_id` = the outbox id, the row's creation time, its headers and, when it
/// has a `content-type` header, that content type.
pub(super) fn properties(row: &StoredMessage) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(ShortString::from(row.id.to_string()))
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0))
        .with_headers(headers(row));
    if let Some((_, ct)) = row.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        p = p.with_content_type(ShortString::from(ct.clone()));
    }
    p
}

/// The longest AMQP short string: its length is one byte.
const SHORT_STRING_MAX: usize = 255;

/// Why `row` cannot be sent as AMQP properties, if it cannot: a header name or the content type
/// longer than a short string (lapin would write a wrong length and the server close the
/// connection), or properties larger than one frame of `frame_max` bytes can carry (lapin sends
/// them as one frame; the server closes the connection). Sending it again would fail the same way.
pub(super) fn unsendable(row: &StoredMessage, frame_max: usize) -> Option<String> {
    if let Some((name, _)) = row.headers.iter().find(|(k, _)| k.len() > SHORT_STRING_MAX) {
        return Some(format!(
            "header name of {} bytes, longer than AMQP's {SHORT_STRING_MAX}: {}...",
            name.len(),
            name.chars().take(40).collect::<String>()
        ));
    }
    let content_type = row.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if let Some((_, ct)) = content_type.filter(|(_, ct)| ct.len() > SHORT_STRING_MAX) {
        return Some(format!(
            "content-type of {} bytes, longer than AMQP's {SHORT_STRING_MAX}",
            ct.len()
        ));
    }
    // The content header frame: 8 bytes of frame, 14 of class, weight, body size and flags, the
    // message id, timestamp, delivery mode and content type, and the header table (4 bytes, then
    // per entry a name, a type byte and a long string). A margin covers what is not counted.
    let headers: usize = [
        (HEADER_ID, 36),
        (HEADER_KEY, row.key.as_ref().map_or(0, String::len)),
        (HEADER_SEQ, 20),
        (HEADER_SOURCE, row.source.as_ref().map_or(0, String::len)),
    ]
    .into_iter()
    .chain(row.headers.iter().map(|(k, v)| (k.as_str(), v.len())))
    .map(|(k, v)| 1 + k.len() + 1 + 4 + v)
    .sum();
    let size = 8 + 14 + (1 + 36) + 8 + 1 + content_type.map_or(0, |(_, ct)| 1 + ct.len()) + 4 + headers + 256;
    (size > frame_max)
        .then(|| format!("headers of about {size} bytes, more than one AMQP frame ({frame_max} bytes) carries"))
}
