//! The engine's settings, with their defaults in one place, and the retry/backoff policy.

use std::time::Duration;

use derive_setters::Setters;
use outbox::{Backoff, InvalidBackoff};
use serde::Deserialize;

/// What happens to a key whose message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterPolicy {
    /// The key moves on: later messages of the key are published.
    #[default]
    Skip,
    /// The key waits until an operator retries or discards the dead letter.
    Park,
}

/// When a lane claims its next batch. Claiming during the publish hides one claim per round behind
/// the broker's round trip, but the lanes already overlap each other's claims and publishes: with
/// many lanes busy the database is the limit, and claiming ahead only adds load to it (BENCHMARKS.md,
/// figure 2: 0.90x on tansu, 0.82x with a simulated remote broker). Hence `Never` by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClaimAhead {
    /// While the current batch is being published, if the lane's last publish took longer than
    /// its last claim (the broker is the slower side).
    Auto,
    /// Always while the current batch is being published.
    Always,
    /// Only after the current batch is marked.
    #[default]
    Never,
}

/// Relay engine settings. Every field has a documented default and a setter of its name.
#[derive(Debug, Clone, Setters)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Owner name written into leases; must be unique per running relay. Defaults to
    /// `<hostname>-<pid>-<random>`.
    pub owner: String,
    /// Rows claimed and published per lane per round. Defaults to 500.
    pub batch_size: usize,
    /// Batches a lane may have in flight at once (published, waiting for the broker's answer or
    /// their marks), as long as they hold fewer than [`RelayConfig::batch_size`] rows together and
    /// the lane's claims take less than half as long as its publishes (otherwise the database is
    /// the bottleneck and rows wait to go out together): a row committed while its lane's batch is
    /// in flight is claimed and published at once instead of waiting for that batch (found by the
    /// watch of a lingering lane, or by the NOTIFY of its commit to an idle one). A key is in one
    /// batch in flight at the most; batches are marked in the order they were claimed. A lane
    /// that no commit wakes (MySQL, SQLite, NOTIFY off, not lingering) looks once more when its
    /// batch is settled, as with one batch at a time. 1: one batch at a time. Defaults to 4: with
    /// lanes woken by NOTIFY claiming once per wake-up, four batches cost no more claims per
    /// message than one, and p99 at 5,000 msg/s was 0.68-0.70x of one batch's in a quiet hour,
    /// 0.66-1.19x (median 0.98) in busier ones (BENCHMARKS.md, figure 3).
    pub pipeline: usize,
    /// How often an idle lane looks for work without a wake-up. Defaults to 1 s. A lane that backed
    /// a row off looks again when that row's delay ends, if that comes sooner.
    pub poll_interval: Duration,
    /// How long a lane that found work keeps watching for more before it asks writers for a
    /// NOTIFY again (PostgreSQL). Meanwhile its flag says busy, so committing transactions send no
    /// NOTIFY (which makes commits take turns), and one query every
    /// [`RelayConfig::linger_poll_interval`] finds the watched lanes that got rows. Zero: a lane
    /// asks for NOTIFY as soon as it finds no row. Defaults to 1 s. Under the adaptive pace on
    /// PostgreSQL, only while the database takes more writes than
    /// [`RelayConfig::linger_above_writes`].
    pub linger: Duration,
    /// How often the lanes that linger are looked at, all with one query. Below 5 ms, only while
    /// the looks find rows: after each one that finds none the next waits twice as long, up to
    /// 5 ms. Defaults to 5 ms. At 1 ms the p99 from commit to the broker was a quarter to a third
    /// lower at 1,000 and 5,000 msg/s on one day, 0.9x at 5,000 on another; at 2 ms the part from
    /// commit to publish was half a millisecond shorter; writers that saturate the database beside
    /// the relay lost 0.01-0.10 of their throughput (BENCHMARKS.md, figures 1 and 3).
    pub linger_poll_interval: Duration,
    /// With the adaptive pace, the longest the lingering lanes may go unlooked at, trading latency
    /// for the service's throughput. While the relay slows commits by more than
    /// [`RelayConfig::pace_slowdown`] (the pace's working against quiet commit times), the look
    /// comes half as often each second (up to this, and at most half the linger), so each claim
    /// and mark carries more rows and the relay's statements leave the database to the service;
    /// within the slowdown it comes back towards [`RelayConfig::linger_poll_interval`]. Off by
    /// default: the same signal rises for a service that keeps up with its load, whose messages
    /// would only wait longer (BENCHMARKS.md, figures 1 and 3). Zero (the default): always
    /// [`RelayConfig::linger_poll_interval`].
    pub linger_poll_max: Duration,
    /// With the adaptive pace on PostgreSQL, lanes linger only while the database takes more than
    /// this many writes a second besides the relay's own (transaction ids handed out, every
    /// database of the server), and stop below half of it: a lane that does not linger asks for
    /// NOTIFY as soon as it runs dry, so a commit wakes it at once instead of the next look. At
    /// 200 commits a second that brought the p99 from commit to the broker from 2.7-3.6x the raw
    /// producer's to 1.2-1.7x at 1,000 msg/s and 1.5-2.4x at 5,000; writers that saturate the
    /// database (thousands of commits a second) keep about 0.65 of their throughput beside
    /// lingering lanes against 0.45 beside lanes that notify (BENCHMARKS.md, figures 1 and 3). A
    /// relay woken in-process by its writers ([`crate::Relay::wake_on`]) always lingers: their
    /// commits wake it at once anyway. Defaults to 500. 0: lanes always linger (as without the
    /// adaptive pace).
    pub linger_above_writes: f64,
    /// Lease duration; leases are renewed every third of it. Defaults to 30 s.
    pub lease_ttl: Duration,
    /// At most this many lanes per relay; by default a fair share of the lanes among live relays.
    pub max_lanes: Option<usize>,
    /// Attempts before a retryable failure is dead-lettered. Defaults to 20.
    pub max_attempts: i32,
    /// First retry delay. Defaults to 200 ms; doubles per attempt, jittered (uniform between half
    /// the delay and the delay).
    pub backoff_base: Duration,
    /// Retry delay cap. Defaults to 60 s.
    pub backoff_max: Duration,
    /// Skip (default) or park the key of a dead-lettered message.
    pub dead_letter_policy: DeadLetterPolicy,
    /// On shutdown, how long to wait for in-flight batches. Defaults to 30 s.
    pub shutdown_grace: Duration,
    /// How often pending count and oldest age are refreshed for metrics. Defaults to 10 s.
    pub stats_interval: Duration,
    /// At most this many batches are claimed and published at the same time, all lanes together
    /// (the others wait their turn): a lane with several batches in flight ([`Self::pipeline`])
    /// takes a turn for each, so with one batch per lane, as while a backlog drains, this many
    /// lanes work at once. Bounds the relay's share of the database. Defaults to none (every held
    /// lane works at once).
    pub max_busy_lanes: Option<usize>,
    /// At most this many messages per second, all lanes of this relay together (a pace while a
    /// backlog drains, like `max_busy_lanes` but by rate). Defaults to none.
    pub max_rate: Option<u32>,
    /// Whether the relay paces itself for the service: every second it times a tiny committing
    /// transaction while it works and again in a short quiet window (no round starts). While a
    /// service is busy (PostgreSQL: the database finished over 100 transactions a second beyond the
    /// relay's own, from `pg_stat_database`; elsewhere: quiet commits well above their fastest of the
    /// last 5 minutes) it keeps its own slowdown of commits within 15%, down to one lane working 5%
    /// of the time; otherwise it doubles up to every lane. Starts at one lane. Only lanes catching
    /// up (their last claim was full) are paced. `max_busy_lanes` and `max_rate` stay hard caps.
    /// Defaults to on.
    pub adaptive_pace: bool,
    /// With the adaptive pace: while the oldest row a lane claims (or the rows behind a resting
    /// lane's last batch) has waited longer than this, the pace stays at one lane or more (working
    /// without rest, and a resting lane stops resting), whatever the service's load.
    /// Defaults to 5 minutes.
    pub pace_max_lag: Duration,
    /// With the adaptive pace, how much the relay may slow a busy service's commits while it
    /// catches up: 0.15 lets a commit take 15% longer than without the relay (the pace cuts the
    /// lanes when it is over, and adds to them slowly when it is under). Defaults to 0.15.
    pub pace_slowdown: f64,
    /// Whether a lane claims its next batch while the current one is being published. Defaults
    /// to [`ClaimAhead::Never`].
    pub claim_ahead: ClaimAhead,
    /// How often published rows kept by the store (`keep_published`) that are older than
    /// [`RelayConfig::published_retention`] are deleted, in small batches. Defaults to 5 minutes.
    pub cleanup_interval: Duration,
    /// How long kept published rows stay. Defaults to 7 days.
    pub published_retention: Duration,
    /// A name for the database this relay drains. When set, every metric carries the label
    /// `database="<name>"` and the relay's log lines the field `database`, so one process can run
    /// relays for several databases. Defaults to none.
    pub name: Option<String>,
}

impl RelayConfig {
    /// Default [`RelayConfig::batch_size`].
    pub const DEFAULT_BATCH_SIZE: usize = 500;
    /// Default [`RelayConfig::pipeline`].
    pub const DEFAULT_PIPELINE: usize = 4;
    /// Default [`RelayConfig::poll_interval`].
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// Default [`RelayConfig::linger`].
    pub const DEFAULT_LINGER: Duration = Duration::from_secs(1);
    /// Default [`RelayConfig::linger_poll_interval`].
    pub const DEFAULT_LINGER_POLL_INTERVAL: Duration = Duration::from_millis(5);
    /// Default [`RelayConfig::linger_poll_max`]: none, the look stays at `linger_poll_interval`.
    pub const DEFAULT_LINGER_POLL_MAX: Duration = Duration::ZERO;
    /// Default [`RelayConfig::linger_above_writes`].
    pub const DEFAULT_LINGER_ABOVE_WRITES: f64 = 500.0;
    /// Default [`RelayConfig::lease_ttl`].
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
    /// Default [`RelayConfig::max_attempts`].
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;
    /// Default [`RelayConfig::backoff_base`].
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);
    /// Default [`RelayConfig::backoff_max`].
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
    /// Default [`RelayConfig::dead_letter_policy`].
    pub const DEFAULT_DEAD_LETTER_POLICY: DeadLetterPolicy = DeadLetterPolicy::Skip;
    /// Default [`RelayConfig::shutdown_grace`].
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// Default [`RelayConfig::stats_interval`].
    pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(10);
    /// Default [`RelayConfig::adaptive_pace`].
    pub const DEFAULT_ADAPTIVE_PACE: bool = true;
    /// Default [`RelayConfig::pace_max_lag`].
    pub const DEFAULT_PACE_MAX_LAG: Duration = Duration::from_secs(5 * 60);
    /// Default [`RelayConfig::pace_slowdown`].
    pub const DEFAULT_PACE_SLOWDOWN: f64 = 0.15;
    /// Default [`RelayConfig::claim_ahead`].
    pub const DEFAULT_CLAIM_AHEAD: ClaimAhead = ClaimAhead::Never;
    /// Default [`RelayConfig::cleanup_interval`].
    pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(5 * 60);
    /// Default [`RelayConfig::published_retention`].
    pub const DEFAULT_PUBLISHED_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            owner: default_owner(),
            batch_size: Self::DEFAULT_BATCH_SIZE,
            pipeline: Self::DEFAULT_PIPELINE,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            linger: Self::DEFAULT_LINGER,
            linger_poll_interval: Self::DEFAULT_LINGER_POLL_INTERVAL,
            linger_poll_max: Self::DEFAULT_LINGER_POLL_MAX,
            linger_above_writes: Self::DEFAULT_LINGER_ABOVE_WRITES,
            lease_ttl: Self::DEFAULT_LEASE_TTL,
            max_lanes: None,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            backoff_base: Self::DEFAULT_BACKOFF_BASE,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
            dead_letter_policy: Self::DEFAULT_DEAD_LETTER_POLICY,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            stats_interval: Self::DEFAULT_STATS_INTERVAL,
            max_busy_lanes: None,
            max_rate: None,
            adaptive_pace: Self::DEFAULT_ADAPTIVE_PACE,
            pace_max_lag: Self::DEFAULT_PACE_MAX_LAG,
            pace_slowdown: Self::DEFAULT_PACE_SLOWDOWN,
            claim_ahead: Self::DEFAULT_CLAIM_AHEAD,
            cleanup_interval: Self::DEFAULT_CLEANUP_INTERVAL,
            published_retention: Self::DEFAULT_PUBLISHED_RETENTION,
            name: None,
        }
    }
}

impl RelayConfig {
    /// The retry delays: from [`RelayConfig::backoff_base`], doubling per attempt up to
    /// [`RelayConfig::backoff_max`], with jitter so relays that failed together do not retry
    /// together.
    pub fn retry_backoff(&self) -> Result<Backoff, InvalidBackoff> {
        Backoff::new(self.backoff_base, self.backoff_max)
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if self.pipeline == 0 {
            return Err("pipeline must be at least 1".into());
        }
        if self.max_attempts < 1 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.poll_interval < Duration::from_millis(1) {
            return Err("poll_interval must be at least 1ms (0 would claim again at once, every idle lane)".into());
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err("lease_ttl must be at least 1s".into());
        }
        if self.lease_ttl > Duration::from_secs(86_400) {
            return Err("lease_ttl must be at most a day (a relay that dies keeps its lanes that long)".into());
        }
        if self.max_rate == Some(0) {
            return Err("max_rate must be at least 1".into());
        }
        if self.max_busy_lanes == Some(0) {
            return Err("max_busy_lanes must be at least 1".into());
        }
        if self.owner.is_empty() {
            return Err("owner must not be empty".into());
        }
        if let Err(e) = self.retry_backoff() {
            return Err(e.to_string());
        }
        if !self.linger.is_zero() && self.linger_poll_interval < Duration::from_millis(1) {
            return Err("linger_poll_interval must be at least 1ms".into());
        }
        if !self.linger_poll_max.is_zero() && self.linger_poll_max < self.linger_poll_interval {
            return Err(format!(
                "linger_poll_max ({:?}) must be 0 or at least linger_poll_interval ({:?})",
                self.linger_poll_max, self.linger_poll_interval
            ));
        }
        if !(self.linger_above_writes >= 0.0 && self.linger_above_writes.is_finite()) {
            return Err("linger_above_writes must be 0 or more writes a second".into());
        }
        if !(self.pace_slowdown > 0.0 && self.pace_slowdown <= 10.0) {
            return Err("pace_slowdown must be above 0 and at most 10 (a commit 11 times as long)".into());
        }
        if self.cleanup_interval < Duration::from_millis(100) {
            return Err("cleanup_interval must be at least 100ms".into());
        }
        Ok(())
    }
}

/// Parses the lowercase names the configuration uses (`skip`, `park`).
impl std::str::FromStr for DeadLetterPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        by_name(
            s,
            "dead-letter policy",
            &[("skip", DeadLetterPolicy::Skip), ("park", DeadLetterPolicy::Park)],
        )
    }
}

/// Parses the lowercase names the configuration uses (`auto`, `always`, `never`).
impl std::str::FromStr for ClaimAhead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        by_name(
            s,
            "claim_ahead",
            &[
                ("auto", ClaimAhead::Auto),
                ("always", ClaimAhead::Always),
                ("never", ClaimAhead::Never),
            ],
        )
    }
}

/// The value named `s` in `names`, or an error that lists the names (`expected a, b or c`).
fn by_name<T: Copy>(s: &str, what: &str, names: &[(&str, T)]) -> Result<T, String> {
    if let Some((_, value)) = names.iter().find(|(name, _)| *name == s) {
        return Ok(*value);
    }
    let listed: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
    let expected = match listed.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(format!("unknown {what} {s:?}: expected {expected}"))
}

fn default_owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "relay".into());
    let rnd = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rnd[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_or_endless_linger_above_writes_is_refused() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = RelayConfig::default().linger_above_writes(bad).validate().unwrap_err();
            assert!(err.contains("linger_above_writes"), "{bad}: {err}");
        }
        RelayConfig::default().linger_above_writes(0.0).validate().unwrap();
    }

    #[test]
    fn a_pace_slowdown_of_zero_or_less_is_refused() {
        for bad in [0.0, -0.1, f64::NAN, 11.0] {
            let err = RelayConfig::default().pace_slowdown(bad).validate().unwrap_err();
            assert!(err.contains("pace_slowdown"), "{bad}: {err}");
        }
        RelayConfig::default().pace_slowdown(0.05).validate().unwrap();
    }

    #[test]
    fn a_linger_poll_max_below_the_interval_is_refused() {
        let c = RelayConfig::default().linger_poll_max(Duration::from_millis(4));
        assert_eq!(
            c.validate().unwrap_err(),
            "linger_poll_max (4ms) must be 0 or at least linger_poll_interval (5ms)"
        );
        c.clone()
            .linger_poll_interval(Duration::from_millis(4))
            .validate()
            .unwrap();
        c.linger_poll_max(Duration::ZERO).validate().unwrap();
    }

    #[test]
    fn a_backoff_base_above_its_cap_is_refused() {
        let c = RelayConfig::default().backoff_base(Duration::from_secs(90));
        assert!(c.validate().unwrap_err().contains("at most max"));
        assert!(RelayConfig::default().retry_backoff().is_ok());
    }

    /// A poll interval of 0 was accepted: every idle lane then claimed again as soon as its claim
    /// came back, 32 lanes querying an empty outbox back to back.
    #[test]
    fn a_poll_interval_under_a_millisecond_is_refused() {
        let err = RelayConfig::default()
            .poll_interval(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(err.contains("poll_interval"), "{err}");
        RelayConfig::default()
            .poll_interval(Duration::from_millis(1))
            .validate()
            .unwrap();
    }

    /// A lease that would keep a dead relay's lanes for over a day is refused, and with it one
    /// whose expiry lies past what the databases' dates hold (the year 9999).
    #[test]
    fn a_lease_longer_than_a_day_is_refused() {
        let err = RelayConfig::default()
            .lease_ttl(Duration::from_secs(400_000 * 366 * 86_400))
            .validate()
            .unwrap_err();
        assert!(err.contains("lease_ttl"), "{err}");
        assert!(RelayConfig::default()
            .lease_ttl(Duration::from_secs(86_401))
            .validate()
            .is_err());
        RelayConfig::default()
            .lease_ttl(Duration::from_secs(86_400))
            .validate()
            .unwrap();
    }

    #[test]
    fn owners_are_unique() {
        assert_ne!(RelayConfig::default().owner, RelayConfig::default().owner);
        assert!(RelayConfig::default().batch_size(0).validate().is_err());
    }

    #[test]
    fn names_parse_and_unknown_ones_list_the_known() {
        assert_eq!("park".parse(), Ok(DeadLetterPolicy::Park));
        assert_eq!("always".parse(), Ok(ClaimAhead::Always));
        assert_eq!(
            "drop".parse::<DeadLetterPolicy>(),
            Err("unknown dead-letter policy \"drop\": expected skip or park".to_owned())
        );
        assert_eq!(
            "".parse::<ClaimAhead>(),
            Err("unknown claim_ahead \"\": expected auto, always or never".to_owned())
        );
    }
}
