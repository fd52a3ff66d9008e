#![doc = include_str!("../README.md")]

mod config;
mod consumer;
mod error;
mod publisher;
mod stream;
mod subject;

pub use config::{NatsConfig, DEFAULT_ACK_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_URL};
pub use consumer::{
    NatsConsumerConfig, NatsConsumerRunner, NatsConsumerStats, HEADER_DELIVERIES, HEADER_ERROR,
    HEADER_ORIGINAL_SEQUENCE, HEADER_ORIGINAL_STREAM, HEADER_ORIGINAL_SUBJECT,
};
pub use error::NatsError;
pub use publisher::{classify, NatsPublisher};
pub use stream::{ensure_stream, DEFAULT_DUPLICATE_WINDOW};
pub use subject::{key_token, subject_for, NO_KEY_TOKEN};

// Async-nats, as this crate uses it (streams, readers, the client of a publisher or runner).
pub use async_nats;
