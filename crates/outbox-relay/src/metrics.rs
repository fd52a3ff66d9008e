//! Metric names, in one place so dashboards and code agree. The relay registers its meters when it
//! starts ([`crate::Relay::run_until`]): install the metrics recorder before that.

/// Messages confirmed by the broker and marked.
pub const PUBLISHED: &str = "outbox_published_total";
/// Publish attempts that failed, label `kind` = retryable | permanent | unavailable.
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
/// The adaptive pace: how many lanes may work at once (below 1: the share of the time one lane
/// works). 32 when the database answers quickly; absent when the pace is not adaptive.
pub const PACE: &str = "outbox_pace_lanes";
/// Store (database) operations that failed and will be retried.
pub const STORE_ERRORS: &str = "outbox_store_errors_total";

/// The relay's meters, registered once with its labels: `database` = [`crate::RelayConfig::name`]
/// when set, so relays of one process draining several databases keep their figures apart.
pub(crate) struct Meters {
    pub(crate) published: metrics::Counter,
    pub(crate) failed_retryable: metrics::Counter,
    pub(crate) failed_permanent: metrics::Counter,
    pub(crate) failed_unavailable: metrics::Counter,
    pub(crate) retried: metrics::Counter,
    pub(crate) dead_lettered: metrics::Counter,
    pub(crate) store_errors: metrics::Counter,
    pub(crate) pending: metrics::Gauge,
    pub(crate) oldest_pending_age: metrics::Gauge,
    pub(crate) dead_letters: metrics::Gauge,
    pub(crate) lanes_held: metrics::Gauge,
    pub(crate) lanes_unowned: metrics::Gauge,
    pub(crate) pace: metrics::Gauge,
    pub(crate) publish_latency: metrics::Histogram,
    pub(crate) batch_duration: metrics::Histogram,
}

impl Meters {
    pub(crate) fn new(name: Option<&str>) -> Self {
        let base: Vec<metrics::Label> = name
            .map(|n| metrics::Label::new("database", n.to_owned()))
            .into_iter()
            .collect();
        let with_kind = |kind: &'static str| {
            let mut l = base.clone();
            l.push(metrics::Label::new("kind", kind));
            l
        };
        Meters {
            published: metrics::counter!(PUBLISHED, base.clone()),
            failed_retryable: metrics::counter!(FAILED, with_kind("retryable")),
            failed_permanent: metrics::counter!(FAILED, with_kind("permanent")),
            failed_unavailable: metrics::counter!(FAILED, with_kind("unavailable")),
            retried: metrics::counter!(RETRIED, base.clone()),
            dead_lettered: metrics::counter!(DEAD_LETTERED, base.clone()),
            store_errors: metrics::counter!(STORE_ERRORS, base.clone()),
            pending: metrics::gauge!(PENDING, base.clone()),
            oldest_pending_age: metrics::gauge!(OLDEST_PENDING_AGE, base.clone()),
            dead_letters: metrics::gauge!(DEAD_LETTERS, base.clone()),
            lanes_held: metrics::gauge!(LANES_HELD, base.clone()),
            lanes_unowned: metrics::gauge!(LANES_UNOWNED, base.clone()),
            pace: metrics::gauge!(PACE, base.clone()),
            publish_latency: metrics::histogram!(PUBLISH_LATENCY, base.clone()),
            batch_duration: metrics::histogram!(BATCH_DURATION, base),
        }
    }
}
