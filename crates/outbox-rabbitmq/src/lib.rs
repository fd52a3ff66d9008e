//! RabbitMQ adapter for the outbox.
