//! The consumer runner's settings.

use std::time::Duration;

#[cfg(doc)]
use outbox_inbox::Inbox;
use serde::Deserialize;

use derive_setters::Setters;
use educe::Educe;

/// Consumer runner settings. Parsed from a file with serde (`deny_unknown_fields`); every field but
/// `stream` and `durable` has a default.
#[derive(Clone, Deserialize, Educe, Setters)]
#[educe(Debug)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct NatsConsumerConfig {
    /// Server URLs, as [`NatsConfig::url`](crate::NatsConfig::url) (credentials never logged).
    /// Defaults to `nats://127.0.0.1:4222`.
    #[educe(Debug(method(outbox::redact::debug_url)))]
    #[setters(into)]
    pub url: String,
    /// The stream to consume. Required.
    #[setters(into)]
    pub stream: String,
    /// The durable consumer's name: members that share it share the work. Required.
    #[setters(into)]
    pub durable: String,
    /// Only subjects matching this filter (e.g. `chat.room-1.*`); empty for the whole stream.
    /// Defaults to empty.
    #[setters(into)]
    pub filter_subject: String,
    /// The delivery whose handler fails for the `max_deliver`-th time is dead-lettered. Counted
    /// by the server: deliveries after a runner stopped or died before its ack count too. The
    /// consumer itself is created with an unlimited `max_deliver`, so the server never drops a
    /// message without a dead letter. Defaults to 5.
    #[setters(skip)]
    pub max_deliver: i64,
    /// How long the server waits for an ack before it delivers the message again (to this or
    /// another member); `ack_wait_ms` in a file. Defaults to 30 s.
    #[serde(rename = "ack_wait_ms", deserialize_with = "outbox::millis::deserialize")]
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged, per consumer (all members together). 1 keeps
    /// every subject, so every key, in stream order even when a message is retried: nothing is
    /// delivered until it is acknowledged or dead-lettered. More lets a later message pass one
    /// that waits for its retry; then keep per-key order with the inbox's `GapPolicy::Hold`
    /// (a successor is parked until its predecessor is applied) or with one consumer per key
    /// subject (`filter_subject`). Defaults to 1.
    pub max_ack_pending: i64,
    /// First retry delay of a failed handler; doubles per delivery, jittered ([`outbox::Backoff`]).
    /// `backoff_base_ms` in a file. Defaults to 100 ms.
    #[serde(rename = "backoff_base_ms", deserialize_with = "outbox::millis::deserialize")]
    pub backoff_base: Duration,
    /// Retry delay cap (also of the wait for the database); `backoff_max_ms` in a file. Defaults to
    /// 5 s.
    #[serde(rename = "backoff_max_ms", deserialize_with = "outbox::millis::deserialize")]
    pub backoff_max: Duration,
    /// A dead-lettered message from subject `S` is published to `<dead_letter_prefix>.S`.
    /// Defaults to `"dlq"`.
    #[setters(into)]
    pub dead_letter_prefix: String,
    /// Create the stream `<stream>_DLQ` taking `<dead_letter_prefix>.<subject>` for each of the
    /// consumed stream's subjects, if it does not exist. Without any stream for the dead-letter
    /// subject, a message to dead-letter waits (and is retried) instead of being dropped.
    /// Defaults to true.
    pub create_dead_letter_stream: bool,
    /// How often the runner deletes the inbox's expired records ([`Inbox::cleanup`]); `None` leaves
    /// it to the application (`cleanup_interval_ms` in a file, 0 for never). Defaults to 10 minutes.
    #[serde(
        rename = "cleanup_interval_ms",
        deserialize_with = "outbox::millis::deserialize_zero_never"
    )]
    pub cleanup_interval: Option<Duration>,
    /// The connection name the server shows. Defaults to `"outbox-consumer"`.
    #[setters(into)]
    pub connection_name: String,
}

impl Default for NatsConsumerConfig {
    fn default() -> Self {
        NatsConsumerConfig {
            url: crate::config::DEFAULT_URL.to_owned(),
            stream: String::new(),
            durable: String::new(),
            filter_subject: String::new(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            dead_letter_prefix: "dlq".to_owned(),
            create_dead_letter_stream: true,
            cleanup_interval: Some(Duration::from_secs(600)),
            connection_name: "outbox-consumer".to_owned(),
        }
    }
}

impl NatsConsumerConfig {
    /// Settings for durable consumer `durable` of `stream`, the rest defaults.
    pub fn new(stream: impl Into<String>, durable: impl Into<String>) -> Self {
        NatsConsumerConfig {
            stream: stream.into(),
            durable: durable.into(),
            ..Default::default()
        }
    }
    /// Sets [`NatsConsumerConfig::max_deliver`] (at least 1).
    pub fn max_deliver(mut self, n: i64) -> Self {
        self.max_deliver = n.max(1);
        self
    }
}
