//! The `[relay]` and `[admin]` sections. Each type is read twice: from the file (serde) and from
//! the flags and environment variables (clap, the keys marked `#[arg(long, env)]`; the others are
//! file-only, `#[arg(skip)]`). `over` layers the two, flags first.

use std::time::Duration;

use serde::Deserialize;

use outbox_relay::{ClaimAhead, DeadLetterPolicy, RelayConfig};

use super::Millis;

/// Default `[admin] listen`.
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Default `[admin] broker_unavailable_ms`: how long the broker may be unreachable before `/readyz`
/// fails.
pub(crate) const DEFAULT_BROKER_UNAVAILABLE: Duration = Duration::from_secs(60);

/// Default `[relay] keep_published`.
pub(crate) const DEFAULT_KEEP_PUBLISHED: bool = false;

/// `[relay]` section; the defaults are `RelayConfig::DEFAULT_*` (see [`RelaySection::engine`]).
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelaySection {
    /// Lease owner name.
    #[arg(skip)]
    pub(crate) owner: Option<String>,
    /// Rows per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", global = true)]
    pub(crate) batch_size: Option<usize>,
    /// Batches a lane may have in flight at once.
    #[arg(skip)]
    pub(crate) pipeline: Option<usize>,
    /// Poll interval in milliseconds.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", global = true)]
    pub(crate) poll_interval_ms: Option<Millis>,
    /// Lease TTL in milliseconds.
    #[arg(long, env = "OUTBOX_LEASE_TTL_MS", global = true)]
    pub(crate) lease_ttl_ms: Option<Millis>,
    /// How long a lane that found work keeps watching for more (writers skip NOTIFY meanwhile).
    #[arg(skip)]
    pub(crate) linger_ms: Option<Millis>,
    /// How often the lingering lanes are looked at.
    #[arg(skip)]
    pub(crate) linger_poll_interval_ms: Option<Millis>,
    /// With the adaptive pace, the longest the lingering lanes go unlooked at.
    #[arg(skip)]
    pub(crate) linger_poll_max_ms: Option<Millis>,
    /// With the adaptive pace, the others' writes a second above which lanes linger.
    #[arg(skip)]
    pub(crate) linger_above_writes: Option<f64>,
    /// Pace the relay by the database's answers.
    #[arg(skip)]
    pub(crate) adaptive_pace: Option<bool>,
    /// With the adaptive pace, the oldest message's wait beyond which one lane works without rest.
    #[arg(long, env = "OUTBOX_PACE_MAX_LAG_MS", global = true)]
    pub(crate) pace_max_lag_ms: Option<Millis>,
    /// With the adaptive pace, how much the relay may slow a busy service's commits (0.15: 15%).
    #[arg(skip)]
    pub(crate) pace_slowdown: Option<f64>,
    /// Maximum lanes held.
    #[arg(skip)]
    pub(crate) max_lanes: Option<usize>,
    /// Maximum lanes claiming and publishing at the same time.
    #[arg(skip)]
    pub(crate) max_busy_lanes: Option<usize>,
    /// Maximum messages per second (all lanes).
    #[arg(skip)]
    pub(crate) max_rate: Option<u32>,
    /// Dead-letter policy.
    #[arg(long, env = "OUTBOX_DEAD_LETTER_POLICY", global = true)]
    pub(crate) dead_letter_policy: Option<DeadLetterPolicy>,
    /// Attempts before dead-lettering.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", global = true)]
    pub(crate) max_attempts: Option<i32>,
    /// First backoff.
    #[arg(skip)]
    pub(crate) backoff_base_ms: Option<Millis>,
    /// Backoff cap.
    #[arg(skip)]
    pub(crate) backoff_max_ms: Option<Millis>,
    /// Shutdown grace.
    #[arg(skip)]
    pub(crate) shutdown_grace_ms: Option<Millis>,
    /// `auto`, `always` or `never`: claim the next batch while the current one is published.
    #[arg(skip)]
    pub(crate) claim_ahead: Option<ClaimAhead>,
    /// Keep published rows in `outbox_published`.
    #[arg(skip)]
    pub(crate) keep_published: Option<bool>,
    /// How often kept published rows past their retention are deleted.
    #[arg(skip)]
    pub(crate) cleanup_interval_ms: Option<Millis>,
    /// How long kept published rows stay.
    #[arg(skip)]
    pub(crate) published_retention_ms: Option<Millis>,
}

impl RelaySection {
    /// These values (flags, environment) over `file`'s: the one place the sources are layered.
    /// Every key is listed, so a new key does not compile until it is layered too.
    pub(crate) fn over(self, file: RelaySection) -> RelaySection {
        RelaySection {
            owner: self.owner.or(file.owner),
            batch_size: self.batch_size.or(file.batch_size),
            pipeline: self.pipeline.or(file.pipeline),
            poll_interval_ms: self.poll_interval_ms.or(file.poll_interval_ms),
            lease_ttl_ms: self.lease_ttl_ms.or(file.lease_ttl_ms),
            linger_ms: self.linger_ms.or(file.linger_ms),
            linger_poll_interval_ms: self.linger_poll_interval_ms.or(file.linger_poll_interval_ms),
            linger_poll_max_ms: self.linger_poll_max_ms.or(file.linger_poll_max_ms),
            linger_above_writes: self.linger_above_writes.or(file.linger_above_writes),
            adaptive_pace: self.adaptive_pace.or(file.adaptive_pace),
            pace_max_lag_ms: self.pace_max_lag_ms.or(file.pace_max_lag_ms),
            pace_slowdown: self.pace_slowdown.or(file.pace_slowdown),
            max_lanes: self.max_lanes.or(file.max_lanes),
            max_busy_lanes: self.max_busy_lanes.or(file.max_busy_lanes),
            max_rate: self.max_rate.or(file.max_rate),
            dead_letter_policy: self.dead_letter_policy.or(file.dead_letter_policy),
            max_attempts: self.max_attempts.or(file.max_attempts),
            backoff_base_ms: self.backoff_base_ms.or(file.backoff_base_ms),
            backoff_max_ms: self.backoff_max_ms.or(file.backoff_max_ms),
            shutdown_grace_ms: self.shutdown_grace_ms.or(file.shutdown_grace_ms),
            claim_ahead: self.claim_ahead.or(file.claim_ahead),
            keep_published: self.keep_published.or(file.keep_published),
            cleanup_interval_ms: self.cleanup_interval_ms.or(file.cleanup_interval_ms),
            published_retention_ms: self.published_retention_ms.or(file.published_retention_ms),
        }
    }

    /// The engine's settings, validated: each key given, else the engine's named default. The
    /// owner's default (`host-pid-random`) is computed by the engine. `keep_published` is the
    /// store's, not the engine's.
    pub(crate) fn engine(self) -> anyhow::Result<RelayConfig> {
        type C = RelayConfig;
        let mut relay = C::default()
            .batch_size(self.batch_size.unwrap_or(C::DEFAULT_BATCH_SIZE))
            .pipeline(self.pipeline.unwrap_or(C::DEFAULT_PIPELINE))
            .poll_interval(self.poll_interval_ms.map_or(C::DEFAULT_POLL_INTERVAL, Duration::from))
            .lease_ttl(self.lease_ttl_ms.map_or(C::DEFAULT_LEASE_TTL, Duration::from))
            .linger(self.linger_ms.map_or(C::DEFAULT_LINGER, Duration::from))
            .linger_poll_interval(
                self.linger_poll_interval_ms
                    .map_or(C::DEFAULT_LINGER_POLL_INTERVAL, Duration::from),
            )
            .linger_poll_max(
                self.linger_poll_max_ms
                    .map_or(C::DEFAULT_LINGER_POLL_MAX, Duration::from),
            )
            .linger_above_writes(self.linger_above_writes.unwrap_or(C::DEFAULT_LINGER_ABOVE_WRITES))
            .adaptive_pace(self.adaptive_pace.unwrap_or(C::DEFAULT_ADAPTIVE_PACE))
            .pace_max_lag(self.pace_max_lag_ms.map_or(C::DEFAULT_PACE_MAX_LAG, Duration::from))
            .pace_slowdown(self.pace_slowdown.unwrap_or(C::DEFAULT_PACE_SLOWDOWN))
            .max_lanes(self.max_lanes)
            .max_busy_lanes(self.max_busy_lanes)
            .max_rate(self.max_rate)
            .max_attempts(self.max_attempts.unwrap_or(C::DEFAULT_MAX_ATTEMPTS))
            .backoff_base(self.backoff_base_ms.map_or(C::DEFAULT_BACKOFF_BASE, Duration::from))
            .backoff_max(self.backoff_max_ms.map_or(C::DEFAULT_BACKOFF_MAX, Duration::from))
            .dead_letter_policy(self.dead_letter_policy.unwrap_or(C::DEFAULT_DEAD_LETTER_POLICY))
            .shutdown_grace(self.shutdown_grace_ms.map_or(C::DEFAULT_SHUTDOWN_GRACE, Duration::from))
            .claim_ahead(self.claim_ahead.unwrap_or(C::DEFAULT_CLAIM_AHEAD))
            .cleanup_interval(
                self.cleanup_interval_ms
                    .map_or(C::DEFAULT_CLEANUP_INTERVAL, Duration::from),
            )
            .published_retention(
                self.published_retention_ms
                    .map_or(C::DEFAULT_PUBLISHED_RETENTION, Duration::from),
            );
        if let Some(owner) = self.owner {
            relay = relay.owner(owner);
        }
        relay
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid relay settings: {e}"))?;
        Ok(relay)
    }
}

/// `[admin]` section.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSection {
    /// Admin endpoint address.
    #[arg(
        long = "admin-listen",
        value_name = "ADMIN_LISTEN",
        env = "OUTBOX_ADMIN_LISTEN",
        global = true
    )]
    pub(crate) listen: Option<String>,
    /// `/readyz` fails once the broker has been unavailable this long.
    #[arg(skip)]
    pub(crate) broker_unavailable_ms: Option<Millis>,
    /// Token the console's write actions (retry, discard) need; without one they are off. Never a
    /// flag (it would show in the process list): `resolve` reads `OUTBOX_ADMIN_TOKEN` into the
    /// flags' section.
    #[arg(skip)]
    pub(crate) token: Option<String>,
}

impl AdminSection {
    /// These flags with the token of `OUTBOX_ADMIN_TOKEN`; an empty one is no token (a variable
    /// set from an empty secret turned the file's token off, and the console's actions with it).
    pub(crate) fn with_env_token(self, token: Option<String>) -> AdminSection {
        AdminSection {
            token: token.filter(|t| !t.is_empty()),
            ..self
        }
    }

    /// These values (flags, environment) over `file`'s, like [`RelaySection::over`].
    pub(crate) fn over(self, file: AdminSection) -> AdminSection {
        AdminSection {
            listen: self.listen.or(file.listen),
            broker_unavailable_ms: self.broker_unavailable_ms.or(file.broker_unavailable_ms),
            token: self.token.or(file.token),
        }
    }
}
