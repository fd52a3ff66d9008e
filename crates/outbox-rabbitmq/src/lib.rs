#![doc = include_str!("../README.md")]

mod config;
mod consumer;
mod publisher;

pub use config::{
    RabbitConfig, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_URL,
};
pub use consumer::{
    ConsumerError, ConsumerStats, RabbitConsumerConfig, RabbitConsumerRunner, HEADER_ATTEMPTS, HEADER_ERROR,
    HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_TOPIC,
};
pub use publisher::{classify, RabbitPublisher};

/// Errors of [`RabbitPublisher::connect`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// The settings cannot work.
    #[error("invalid RabbitMQ settings: {0}")]
    Config(String),
    /// The server could not be reached, refused the login, or the exchange does not exist. The
    /// message names the server without its password.
    #[error("{0}")]
    Connect(String),
}
