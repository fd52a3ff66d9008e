//! Kafka adapter for the outbox: [`KafkaPublisher`] (the relay's publisher: idempotent producer,
//! delivery confirmation, producer rebuilt on fatal errors) and the consumer runner that commits an
//! offset only after the message was processed.

mod publisher;

pub use publisher::{classify, is_secret, redacted, KafkaPublisher, PRODUCER_DEFAULTS};
