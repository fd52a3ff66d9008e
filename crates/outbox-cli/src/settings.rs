//! The daemon's configuration: a TOML file, then environment variables, then flags (flags win).
//! Unknown keys are errors; secrets are never printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use outbox_nats::NatsConfig;
use outbox_rabbitmq::RabbitConfig;
use outbox_relay::{ClaimAhead, DeadLetterPolicy, RelayConfig};

mod databases;
use databases::databases;

/// The TOML file. Every key is optional; see README "Configuration".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// Database URL: `postgres://`, `mysql://` or `sqlite:`.
    pub(crate) database_url: Option<String>,
    /// PostgreSQL schema holding the outbox tables (default: the server's `search_path`).
    pub(crate) database_schema: Option<String>,
    /// Several databases, one relay each (instead of `database_url`).
    #[serde(default)]
    pub(crate) database: Vec<DatabaseSection>,
    /// Engine settings.
    #[serde(default)]
    pub(crate) relay: RelaySection,
    /// librdkafka settings, passed through unchanged (`"bootstrap.servers" = "..."`).
    pub(crate) kafka: Option<BTreeMap<String, String>>,
    /// RabbitMQ publisher settings.
    pub(crate) rabbitmq: Option<RabbitConfig>,
    /// NATS JetStream publisher settings.
    pub(crate) nats: Option<NatsConfig>,
    /// Admin HTTP endpoint.
    #[serde(default)]
    pub(crate) admin: AdminSection,
}

/// `[relay]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelaySection {
    /// Lease owner name.
    pub(crate) owner: Option<String>,
    /// Rows per batch.
    pub(crate) batch_size: Option<usize>,
    /// Poll interval in milliseconds.
    pub(crate) poll_interval_ms: Option<u64>,
    /// Lease TTL in milliseconds.
    pub(crate) lease_ttl_ms: Option<u64>,
    /// How long a lane that found work keeps watching for more (writers skip NOTIFY meanwhile).
    pub(crate) linger_ms: Option<u64>,
    /// How often the lingering lanes are looked at, in milliseconds.
    pub(crate) linger_poll_interval_ms: Option<u64>,
    /// Pace the relay by the database's answers.
    pub(crate) adaptive_pace: Option<bool>,
    /// Maximum lanes held.
    pub(crate) max_lanes: Option<usize>,
    /// Maximum lanes claiming and publishing at the same time.
    pub(crate) max_busy_lanes: Option<usize>,
    /// Maximum messages per second (all lanes).
    pub(crate) max_rate: Option<u32>,
    /// Attempts before dead-lettering.
    pub(crate) max_attempts: Option<i32>,
    /// First backoff in milliseconds.
    pub(crate) backoff_base_ms: Option<u64>,
    /// Backoff cap in milliseconds.
    pub(crate) backoff_max_ms: Option<u64>,
    /// `skip` or `park`.
    pub(crate) dead_letter_policy: Option<DeadLetterPolicy>,
    /// Shutdown grace in milliseconds.
    pub(crate) shutdown_grace_ms: Option<u64>,
    /// `auto`, `always` or `never` (default): claim the next batch while the current one is published.
    pub(crate) claim_ahead: Option<ClaimAhead>,
    /// Keep published rows in `outbox_published`.
    pub(crate) keep_published: Option<bool>,
    /// How often kept published rows past their retention are deleted, in milliseconds.
    pub(crate) cleanup_interval_ms: Option<u64>,
    /// How long kept published rows stay, in milliseconds.
    pub(crate) published_retention_ms: Option<u64>,
}

/// A `[[database]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DatabaseSection {
    /// Names the database in metrics (`database` label), logs, the console and `--database`.
    pub(crate) name: String,
    /// Database URL: `postgres://`, `mysql://` or `sqlite:`.
    pub(crate) url: String,
    /// PostgreSQL schema holding the outbox tables.
    pub(crate) schema: Option<String>,
}

/// `[admin]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSection {
    /// Address for `/metrics`, `/healthz`, `/readyz` and the console. Defaults to 127.0.0.1:9464.
    pub(crate) listen: Option<String>,
    /// `/readyz` fails once the broker has been unavailable this long, in milliseconds.
    pub(crate) broker_unavailable_ms: Option<u64>,
    /// Token the console's write actions (retry, discard) need; without one they are off.
    pub(crate) token: Option<String>,
}

/// Flags and environment variables (clap resolves flag > env).
#[derive(Debug, Default, clap::Args)]
pub(crate) struct Overrides {
    /// Configuration file (TOML).
    #[arg(long, short, env = "OUTBOX_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Database URL (`postgres://`, `mysql://`, `sqlite:`).
    #[arg(long, env = "OUTBOX_DATABASE_URL", global = true, hide_env_values = true)]
    pub(crate) database_url: Option<String>,
    /// PostgreSQL schema holding the outbox tables (a plain identifier).
    #[arg(long, env = "OUTBOX_DATABASE_SCHEMA", global = true)]
    pub(crate) database_schema: Option<String>,
    /// Only the `[[database]]` of this name (required by the commands that act on one database
    /// when several are configured).
    #[arg(long = "database", env = "OUTBOX_DATABASE", value_name = "NAME", global = true)]
    pub(crate) database: Option<String>,
    /// librdkafka setting KEY=VALUE (repeatable). Environment: OUTBOX_KAFKA_<KEY> with `_` for `.`.
    #[arg(long = "kafka", value_name = "KEY=VALUE", global = true)]
    pub(crate) kafka: Vec<String>,
    /// Rows per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", global = true)]
    pub(crate) batch_size: Option<usize>,
    /// Poll interval in milliseconds.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", global = true)]
    pub(crate) poll_interval_ms: Option<u64>,
    /// Lease TTL in milliseconds.
    #[arg(long, env = "OUTBOX_LEASE_TTL_MS", global = true)]
    pub(crate) lease_ttl_ms: Option<u64>,
    /// Dead-letter policy.
    #[arg(long, env = "OUTBOX_DEAD_LETTER_POLICY", global = true)]
    pub(crate) dead_letter_policy: Option<DeadLetterPolicy>,
    /// Attempts before dead-lettering.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", global = true)]
    pub(crate) max_attempts: Option<i32>,
    /// Admin endpoint address.
    #[arg(long, env = "OUTBOX_ADMIN_LISTEN", global = true)]
    pub(crate) admin_listen: Option<String>,
}

/// The broker the relay publishes to: exactly one of `[kafka]`, `[rabbitmq]`, `[nats]`.
#[derive(Debug)]
pub(crate) enum Broker {
    /// librdkafka settings.
    Kafka(BTreeMap<String, String>),
    /// RabbitMQ (confirms, mandatory, persistent).
    Rabbitmq(RabbitConfig),
    /// NATS JetStream (publish acks, `Nats-Msg-Id`).
    Nats(NatsConfig),
}

/// One database the daemon serves.
#[derive(Debug, Clone)]
pub(crate) struct Database {
    /// The `[[database]]` name; `None` for the single `database_url`.
    pub(crate) name: Option<String>,
    /// Database URL.
    pub(crate) url: String,
    /// PostgreSQL schema of the outbox tables, validated as a plain identifier.
    pub(crate) schema: Option<String>,
}

impl Database {
    /// The name shown in logs and the console (`default` for the single `database_url`).
    pub(crate) fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }
}

/// A secret from the configuration: never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Default `[admin] broker_unavailable_ms`: how long the broker may be unreachable before `/readyz`
/// fails.
pub(crate) const DEFAULT_BROKER_UNAVAILABLE: Duration = Duration::from_secs(60);

/// Everything the daemon needs, resolved.
#[derive(Debug)]
pub(crate) struct Settings {
    /// The databases, at least one; each gets a relay of its own.
    pub(crate) databases: Vec<Database>,
    /// Engine settings.
    pub(crate) relay: RelayConfig,
    /// The broker the relay publishes to.
    pub(crate) broker: Option<Broker>,
    /// Admin address.
    pub(crate) admin_listen: String,
    /// `/readyz` fails once the broker has been unavailable this long.
    pub(crate) broker_unavailable: Duration,
    /// Token for the console's write actions.
    pub(crate) admin_token: Option<Secret>,
    /// Keep published rows.
    pub(crate) keep_published: bool,
}

/// Reads the file (if any), applies environment and flags.
pub(crate) fn resolve(o: &Overrides) -> anyhow::Result<Settings> {
    let file: FileConfig = match &o.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let databases = databases(o, file.database_url, file.database_schema, file.database)?;

    let r = file.relay;
    let ms = Duration::from_millis;
    let mut relay = RelayConfig::default();
    if let Some(v) = r.owner {
        relay = relay.owner(v);
    }
    if let Some(v) = o.batch_size.or(r.batch_size) {
        relay = relay.batch_size(v);
    }
    if let Some(v) = o.poll_interval_ms.or(r.poll_interval_ms) {
        relay = relay.poll_interval(ms(v));
    }
    if let Some(v) = o.lease_ttl_ms.or(r.lease_ttl_ms) {
        relay = relay.lease_ttl(ms(v));
    }
    if let Some(v) = r.linger_ms {
        relay = relay.linger(ms(v));
    }
    if let Some(v) = r.linger_poll_interval_ms {
        relay = relay.linger_poll_interval(ms(v));
    }
    if let Some(v) = r.adaptive_pace {
        relay = relay.adaptive_pace(v);
    }
    if r.max_lanes.is_some() {
        relay = relay.max_lanes(r.max_lanes);
    }
    if r.max_busy_lanes.is_some() {
        relay = relay.max_busy_lanes(r.max_busy_lanes);
    }
    if r.max_rate.is_some() {
        relay = relay.max_rate(r.max_rate);
    }
    if let Some(v) = o.max_attempts.or(r.max_attempts) {
        relay = relay.max_attempts(v);
    }
    if let Some(v) = r.backoff_base_ms {
        relay = relay.backoff_base(ms(v));
    }
    if let Some(v) = r.backoff_max_ms {
        relay = relay.backoff_max(ms(v));
    }
    if let Some(v) = o.dead_letter_policy.or(r.dead_letter_policy) {
        relay = relay.dead_letter_policy(v);
    }
    if let Some(v) = r.shutdown_grace_ms {
        relay = relay.shutdown_grace(ms(v));
    }
    if let Some(v) = r.claim_ahead {
        relay = relay.claim_ahead(v);
    }
    if let Some(v) = r.cleanup_interval_ms {
        relay = relay.cleanup_interval(ms(v));
    }
    if let Some(v) = r.published_retention_ms {
        relay = relay.published_retention(ms(v));
    }
    relay
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid relay settings: {e}"))?;

    let broker = broker(o, file.kafka, file.rabbitmq, file.nats, std::env::vars())?;
    Ok(Settings {
        databases,
        relay,
        broker,
        admin_listen: o
            .admin_listen
            .clone()
            .or(file.admin.listen)
            .unwrap_or_else(|| "127.0.0.1:9464".into()),
        broker_unavailable: file.admin.broker_unavailable_ms.map_or(DEFAULT_BROKER_UNAVAILABLE, ms),
        admin_token: std::env::var("OUTBOX_ADMIN_TOKEN")
            .ok()
            .or(file.admin.token)
            .filter(|t| !t.is_empty())
            .map(Secret),
        keep_published: r.keep_published.unwrap_or(false),
    })
}

/// Picks the one broker the file, the environment and the flags name. Kafka settings come from
/// `[kafka]`, `OUTBOX_KAFKA_<KEY>` and `--kafka`; `OUTBOX_RABBITMQ_URL` and `OUTBOX_NATS_URL` set
/// (or imply) those sections' `url`, so a password can stay out of the file. None at all is `None`:
/// the commands that publish refuse to start without one.
fn broker(
    o: &Overrides,
    kafka_file: Option<BTreeMap<String, String>>,
    mut rabbitmq: Option<RabbitConfig>,
    mut nats: Option<NatsConfig>,
    env: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<Option<Broker>> {
    let mut kafka = kafka_file;
    for (k, v) in env {
        if let Some(rest) = k.strip_prefix("OUTBOX_KAFKA_") {
            kafka
                .get_or_insert_with(BTreeMap::new)
                .insert(rest.to_ascii_lowercase().replace('_', "."), v);
        } else if k == "OUTBOX_RABBITMQ_URL" {
            rabbitmq.get_or_insert_with(RabbitConfig::default).url = v;
        } else if k == "OUTBOX_NATS_URL" {
            nats.get_or_insert_with(NatsConfig::default).url = v;
        }
    }
    for kv in &o.kafka {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--kafka expects KEY=VALUE, got {kv:?}"))?;
        kafka
            .get_or_insert_with(BTreeMap::new)
            .insert(k.trim().to_owned(), v.to_owned());
    }
    let mut chosen: Vec<Broker> = Vec::new();
    chosen.extend(kafka.map(Broker::Kafka));
    chosen.extend(rabbitmq.map(Broker::Rabbitmq));
    chosen.extend(nats.map(Broker::Nats));
    if chosen.len() > 1 {
        let names: Vec<&str> = chosen.iter().map(Broker::name).collect();
        anyhow::bail!(
            "more than one broker configured ({}): keep exactly one of [kafka], [rabbitmq], [nats]",
            names.join(", ")
        );
    }
    Ok(chosen.pop())
}

impl Broker {
    /// The section name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Broker::Kafka(_) => "kafka",
            Broker::Rabbitmq(_) => "rabbitmq",
            Broker::Nats(_) => "nats",
        }
    }
}

/// A schema name goes into SQL text (`CREATE SCHEMA`) and `search_path`, so only a plain lowercase
/// identifier is accepted: nothing to quote, nothing to inject, no case folding surprises.
fn check_schema(schema: &str, url: &str) -> anyhow::Result<()> {
    let mut chars = schema.chars();
    let plain = schema.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain {
        anyhow::bail!(
            "invalid database_schema {schema:?}: expected a plain identifier ([a-z_][a-z0-9_]*, at most 63 characters)"
        );
    }
    if !(url.starts_with("postgres:") || url.starts_with("postgresql:")) {
        anyhow::bail!("database_schema is for PostgreSQL; on MySQL name the database in the URL");
    }
    Ok(())
}

/// The URL with its password replaced by `***`, for logs.
pub(crate) fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.find("://") {
        Some(s) => {
            let rest = &base[s + 3..];
            let end = rest.find('/').unwrap_or(rest.len());
            match rest[..end]
                .rsplit_once('@')
                .and_then(|(creds, host)| Some((creds.split_once(':')?.0, host)))
            {
                Some((user, host)) => format!("{}{user}:***@{host}{}", &base[..s + 3], &rest[end..]),
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if outbox_kafka::is_secret(k) || k.eq_ignore_ascii_case("pass") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests;
