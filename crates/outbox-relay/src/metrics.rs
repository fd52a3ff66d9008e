//! Metric names, in one place so dashboards and code agree.

/// Messages confirmed by the broker and marked.
pub const PUBLISHED: &str = "outbox_published_total";
/// Publish attempts that failed (any reason), label `kind` = retryable | permanent.
pub const FAILED: &str = "outbox_failed_total";
/// Messages scheduled for another attempt after a retryable failure.
pub const RETRIED: &str = "outbox_retried_total";
/// Messages moved to the dead-letter table.
pub const DEAD_LETTERED: &str = "outbox_dead_lettered_total";
/// Rows waiting in the outbox (refreshed every `stats_interval`).
pub const PENDING: &str = "outbox_pending";
/// Age in seconds of the oldest pending row.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Dead letters waiting for an operator.
pub const DEAD_LETTERS: &str = "outbox_dead_letters";
/// Seconds from enqueue (transaction start) to the broker's confirmation.
pub const PUBLISH_LATENCY: &str = "outbox_publish_latency_seconds";
/// Seconds a batch took from produce to the last delivery report.
pub const BATCH_DURATION: &str = "outbox_batch_duration_seconds";
/// Lanes this relay holds.
pub const LANES_HELD: &str = "outbox_lanes_held";
/// Lanes no live relay holds (their messages wait): nonzero for long when the relays' `max_lanes`
/// add up to fewer than the 32 lanes.
pub const LANES_UNOWNED: &str = "outbox_lanes_unowned";
/// Store (database) operations that failed and will be retried.
pub const STORE_ERRORS: &str = "outbox_store_errors_total";
