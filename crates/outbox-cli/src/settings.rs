//! The daemon's configuration: a TOML file, then environment variables, then flags (flags win).
//! Unknown keys are errors; secrets are never printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use outbox_nats::NatsConfig;
use outbox_rabbitmq::RabbitConfig;
use outbox_relay::{ClaimAhead, DeadLetterPolicy, RelayConfig};

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

/// The databases to serve: `--database-url` (or `OUTBOX_DATABASE_URL`) names one and replaces the
/// file's; otherwise the file's `database_url` or its `[[database]]` list (not both). `--database`
/// keeps one entry of the list.
fn databases(
    o: &Overrides,
    file_url: Option<String>,
    file_schema: Option<String>,
    list: Vec<DatabaseSection>,
) -> anyhow::Result<Vec<Database>> {
    let schema = o.database_schema.clone().or(file_schema);
    let single = |url: String| -> anyhow::Result<Vec<Database>> {
        if let Some(s) = &schema {
            check_schema(s, &url)?;
        }
        Ok(vec![Database {
            name: None,
            url,
            schema: schema.clone(),
        }])
    };
    if let Some(url) = o.database_url.clone() {
        return single(url);
    }
    match (file_url, list.is_empty()) {
        (Some(_), false) => anyhow::bail!("database_url and [[database]] both set: keep one of them"),
        (Some(url), true) => return single(url),
        (None, true) => {
            anyhow::bail!("no database URL: set --database-url, OUTBOX_DATABASE_URL, database_url or [[database]]")
        }
        (None, false) => {}
    }
    if schema.is_some() {
        anyhow::bail!("database_schema applies to database_url; give each [[database]] its own schema");
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for d in list {
        let plain = !d.name.is_empty()
            && d.name.len() <= 64
            && d.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        anyhow::ensure!(
            plain,
            "invalid [[database]] name {:?}: expected 1-64 of [A-Za-z0-9_-]",
            d.name
        );
        anyhow::ensure!(
            seen.insert(d.name.clone()),
            "[[database]] name {:?} appears twice",
            d.name
        );
        if let Some(s) = &d.schema {
            check_schema(s, &d.url).map_err(|e| anyhow::anyhow!("[[database]] {}: {e}", d.name))?;
        }
        out.push(Database {
            name: Some(d.name),
            url: d.url,
            schema: d.schema,
        });
    }
    if let Some(name) = &o.database {
        let names: Vec<String> = out.iter().map(|d| d.label().to_owned()).collect();
        out.retain(|d| d.name.as_deref() == Some(name.as_str()));
        anyhow::ensure!(
            !out.is_empty(),
            "--database {name:?}: no such [[database]] (configured: {})",
            names.join(", ")
        );
    }
    Ok(out)
}

impl Settings {
    /// The one database a command acts on: the only one configured, or the one `--database` names.
    pub(crate) fn one_database(&self) -> anyhow::Result<&Database> {
        match self.databases.as_slice() {
            [one] => Ok(one),
            many => anyhow::bail!(
                "{} databases configured ({}): choose one with --database NAME",
                many.len(),
                many.iter().map(Database::label).collect::<Vec<_>>().join(", ")
            ),
        }
    }
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
mod tests {
    use super::*;

    #[test]
    fn exactly_one_broker() {
        let none = Overrides::default();
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(broker(&none, None, None, None, env(&[]).into_iter()).unwrap().is_none());
        let nats: FileConfig = toml::from_str("[nats]\nurl = \"nats://127.0.0.1:4333\"").unwrap();
        match broker(&none, nats.kafka, nats.rabbitmq, nats.nats, env(&[]).into_iter()).unwrap() {
            Some(Broker::Nats(c)) => assert_eq!(c.url, "nats://127.0.0.1:4333"),
            other => panic!("{other:?}"),
        }
        let both: FileConfig = toml::from_str("[nats]\n[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9092\"").unwrap();
        let err = broker(&none, both.kafka, both.rabbitmq, both.nats, env(&[]).into_iter()).unwrap_err();
        assert!(err.to_string().contains("kafka, nats"), "{err}");
        // A Kafka flag beside a [rabbitmq] section is two brokers too.
        let flags = Overrides {
            kafka: vec!["bootstrap.servers=127.0.0.1:9092".into()],
            ..Overrides::default()
        };
        let err = broker(
            &flags,
            None,
            None,
            None,
            env(&[("OUTBOX_RABBITMQ_URL", "amqp://h")]).into_iter(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("kafka, rabbitmq"), "{err}");
        let bad: Result<FileConfig, _> = toml::from_str("[rabbitmq]\nexchnage = \"x\"");
        assert!(bad.is_err(), "a typo in [rabbitmq] is an error");
    }

    /// README's configuration table states each engine default; this pins it to the constants.
    #[test]
    fn readme_states_the_engine_defaults() {
        let readme = include_str!("../../../README.md");
        let default_of = |key: &str| -> String {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `[relay] {key}")))
                .unwrap_or_else(|| panic!("README has no row for [relay] {key}"));
            row.split('|').nth(3).expect("a default column").trim().to_owned()
        };
        let ms = |d: Duration| d.as_millis().to_string();
        type C = RelayConfig;
        assert_eq!(default_of("batch_size"), C::DEFAULT_BATCH_SIZE.to_string());
        assert_eq!(default_of("poll_interval_ms"), ms(C::DEFAULT_POLL_INTERVAL));
        assert_eq!(default_of("lease_ttl_ms"), ms(C::DEFAULT_LEASE_TTL));
        assert_eq!(default_of("max_attempts"), C::DEFAULT_MAX_ATTEMPTS.to_string());
        assert_eq!(
            default_of("backoff_base_ms"),
            format!("{}, {}", ms(C::DEFAULT_BACKOFF_BASE), ms(C::DEFAULT_BACKOFF_MAX))
        );
        assert_eq!(
            default_of("dead_letter_policy"),
            format!("`{}`", name(C::DEFAULT_DEAD_LETTER_POLICY))
        );
        assert_eq!(default_of("shutdown_grace_ms"), ms(C::DEFAULT_SHUTDOWN_GRACE));
        assert_eq!(default_of("claim_ahead"), format!("`{}`", name(C::DEFAULT_CLAIM_AHEAD)));
        let cleanup = default_of("cleanup_interval_ms");
        assert!(
            cleanup.starts_with(&format!(
                "{} (5 min), {} (7 days)",
                ms(C::DEFAULT_CLEANUP_INTERVAL),
                ms(C::DEFAULT_PUBLISHED_RETENTION)
            )),
            "{cleanup}"
        );
        let built = RelayConfig::default();
        assert_eq!(built.batch_size, C::DEFAULT_BATCH_SIZE);
        assert_eq!(built.lease_ttl, C::DEFAULT_LEASE_TTL);
        assert_eq!(built.claim_ahead, C::DEFAULT_CLAIM_AHEAD);
        assert_eq!(built.published_retention, C::DEFAULT_PUBLISHED_RETENTION);
    }

    /// The name the configuration file uses for an enum value (its serde name).
    fn name<T: std::fmt::Debug>(v: T) -> String {
        format!("{v:?}").to_lowercase()
    }

    #[test]
    fn schema_must_be_a_plain_identifier() {
        let pg = "postgres://localhost/app";
        for ok in ["outbox", "_private", "orders_outbox_2"] {
            check_schema(ok, pg).unwrap();
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Outbox",
            "2outbox",
            "out-box",
            "a;drop table x",
            "\"q\"",
            "schéma",
            long.as_str(),
        ] {
            let err = check_schema(bad, pg).unwrap_err().to_string();
            assert!(err.contains("plain identifier"), "{bad:?}: {err}");
        }
        assert!(check_schema("outbox", "mysql://localhost/app").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<FileConfig>("databse_url = 'x'").unwrap_err();
        assert!(err.to_string().contains("databse_url"));
        let err = toml::from_str::<FileConfig>("[relay]\nbatchsize = 1").unwrap_err();
        assert!(err.to_string().contains("batchsize"));
    }

    #[test]
    fn flags_win_over_file() {
        let dir = std::env::temp_dir().join(format!("relay-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::write(
            &dir,
            "database_url = 'postgres://file'\n[relay]\nbatch_size = 10\n[kafka]\n'bootstrap.servers' = 'a:1'\n",
        )
        .unwrap();
        let o = Overrides {
            config: Some(dir.clone()),
            batch_size: Some(20),
            kafka: vec!["bootstrap.servers=b:2".into(), "linger.ms=1".into()],
            ..Default::default()
        };
        let s = resolve(&o).unwrap();
        assert_eq!(s.one_database().unwrap().url, "postgres://file");
        assert_eq!(s.relay.batch_size, 20);
        let Some(Broker::Kafka(kafka)) = &s.broker else {
            panic!("kafka expected: {:?}", s.broker)
        };
        assert_eq!(kafka["bootstrap.servers"], "b:2");
        assert_eq!(kafka["linger.ms"], "1");
        std::fs::remove_file(dir).ok();
    }

    #[test]
    fn many_databases() {
        let file: FileConfig = toml::from_str(
            "[[database]]\nname = 'orders'\nurl = 'postgres://h/orders'\nschema = 'outbox'\n\
             [[database]]\nname = 'billing'\nurl = 'mysql://h/billing'\n",
        )
        .unwrap();
        let none = Overrides::default();
        let dbs = databases(&none, None, None, file.database).unwrap();
        assert_eq!(
            dbs.iter().map(|d| (d.label(), d.schema.as_deref())).collect::<Vec<_>>(),
            [("orders", Some("outbox")), ("billing", None)]
        );
        let list = |text: &str| toml::from_str::<FileConfig>(text).unwrap().database;
        let two =
            "[[database]]\nname = 'a'\nurl = 'postgres://h/a'\n[[database]]\nname = 'b'\nurl = 'postgres://h/b'\n";
        let pick = Overrides {
            database: Some("b".into()),
            ..Overrides::default()
        };
        let picked = databases(&pick, None, None, list(two)).unwrap();
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].url, "postgres://h/b");
        let wrong = Overrides {
            database: Some("c".into()),
            ..Overrides::default()
        };
        let err = databases(&wrong, None, None, list(two)).unwrap_err().to_string();
        assert!(err.contains("configured: a, b"), "{err}");
        let err = databases(&none, Some("postgres://h/x".into()), None, list(two)).unwrap_err();
        assert!(err.to_string().contains("both set"), "{err}");
        let dup =
            "[[database]]\nname = 'a'\nurl = 'postgres://h/a'\n[[database]]\nname = 'a'\nurl = 'postgres://h/b'\n";
        assert!(databases(&none, None, None, list(dup))
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let bad = "[[database]]\nname = 'a b'\nurl = 'postgres://h/a'\n";
        assert!(databases(&none, None, None, list(bad))
            .unwrap_err()
            .to_string()
            .contains("invalid"));
        let schema_on_mysql = "[[database]]\nname = 'a'\nurl = 'mysql://h/a'\nschema = 'x'\n";
        assert!(databases(&none, None, None, list(schema_on_mysql)).is_err());
        // A URL flag names one database and replaces the file's list.
        let flag = Overrides {
            database_url: Some("postgres://flag".into()),
            ..Overrides::default()
        };
        let one = databases(&flag, None, None, list(two)).unwrap();
        assert_eq!((one.len(), one[0].name.as_deref()), (1, None));
        let s = Settings {
            databases: databases(&none, None, None, list(two)).unwrap(),
            relay: RelayConfig::default(),
            broker: None,
            admin_listen: String::new(),
            broker_unavailable: DEFAULT_BROKER_UNAVAILABLE,
            admin_token: Some(Secret("t0ken".into())),
            keep_published: false,
        };
        assert!(s.one_database().unwrap_err().to_string().contains("--database NAME"));
        assert!(!format!("{s:?}").contains("t0ken"), "the token is never printed");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:x.db"), "sqlite:x.db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=disable&password=s&sslpassword=t"),
            "postgres://u@h/db?sslmode=disable&password=***&sslpassword=***"
        );
        assert_eq!(redact_url("mysql://u:p@h/db?x=a@b"), "mysql://u:***@h/db?x=a@b");
    }
}
