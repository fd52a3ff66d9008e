//! Kafka adapter for the outbox: [`KafkaPublisher`] (the relay's publisher: idempotent producer,
//! delivery confirmation, producer rebuilt on fatal errors) and the consumer runner that commits an
//! offset only after the message was processed.

mod admin;
mod consumer;
mod publisher;

pub use admin::ensure_topic;
pub use consumer::{
    ConsumerConfig, ConsumerError, ConsumerRunner, ConsumerStats, HEADER_ATTEMPTS, HEADER_ERROR,
    HEADER_ORIGINAL_OFFSET, HEADER_ORIGINAL_PARTITION, HEADER_ORIGINAL_TOPIC,
};
pub use publisher::{classify, redacted, wire_headers, KafkaPublisher, PRODUCER_DEFAULTS};
