//! The daemon's configuration: a TOML file, then environment variables, then flags (flags win).
//! Unknown keys are errors; secrets are never printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use outbox_nats::NatsConfig;
use outbox_rabbitmq::RabbitConfig;
use outbox_relay::RelayConfig;

mod databases;
mod sections;
use databases::databases;
pub(crate) use outbox::millis::Millis;
pub(crate) use sections::{
    AdminSection, RelaySection, DEFAULT_ADMIN_LISTEN, DEFAULT_BROKER_UNAVAILABLE, DEFAULT_KEEP_PUBLISHED,
};

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
    /// The `[relay]` keys that have a flag.
    #[command(flatten)]
    pub(crate) relay: RelaySection,
    /// The `[admin]` keys that have a flag.
    #[command(flatten)]
    pub(crate) admin: AdminSection,
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
    let relay = o.relay.clone().over(file.relay);
    let keep_published = relay.keep_published.unwrap_or(DEFAULT_KEEP_PUBLISHED);
    let admin = o
        .admin
        .clone()
        .with_env_token(std::env::var("OUTBOX_ADMIN_TOKEN").ok())
        .over(file.admin);
    Ok(Settings {
        databases,
        relay: relay.engine()?,
        broker: broker(o, file.kafka, file.rabbitmq, file.nats, std::env::vars())?,
        admin_listen: admin.listen.unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.into()),
        broker_unavailable: admin
            .broker_unavailable_ms
            .map_or(DEFAULT_BROKER_UNAVAILABLE, Duration::from),
        admin_token: admin.token.filter(|t| !t.is_empty()).map(Secret),
        keep_published,
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
    if let Some(cfg) = &rabbitmq {
        cfg.validate().map_err(|e| anyhow::anyhow!("[rabbitmq]: {e}"))?;
    }
    if let Some(cfg) = &nats {
        cfg.validate().map_err(|e| anyhow::anyhow!("[nats]: {e}"))?;
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

#[cfg(test)]
mod tests;
