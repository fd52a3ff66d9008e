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
