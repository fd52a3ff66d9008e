//! NATS JetStream adapter for the outbox.
