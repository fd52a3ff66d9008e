//! Headers the consumer runners add to a dead letter, named alike for every broker. Each runner
//! adds its broker's own too (partition and offset, exchange and queue, stream and sequence).

/// Header naming why a message was dead-lettered.
pub const HEADER_ERROR: &str = "outbox-error";
/// Header with the topic a dead-lettered message came from (with RabbitMQ: the routing key it was
/// published with).
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox-original-topic";
/// Header with how many handler attempts were made (0 for a message whose outbox headers could not
/// be read).
pub const HEADER_ATTEMPTS: &str = "outbox-attempts";
