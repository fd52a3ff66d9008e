//! The `outbox-relay` daemon: run the relay, migrate, show status, handle dead letters.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox::redact::redact_url;
use outbox_kafka::KafkaPublisher;
use outbox_relay::Relay;
use settings::{resolve, Overrides};
use tokio_util::sync::CancellationToken;

mod admin;
mod console;
mod open;
mod settings;
mod verify;

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Publishes committed outbox rows to Kafka, in order, with confirmation"
)]
struct Cli {
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM/SIGINT (then drain in-flight batches and exit 0).
    Run {
        /// Also apply the outbox migrations at start.
        #[arg(long)]
        migrate: bool,
    },
    /// Create or upgrade the outbox schema.
    Migrate,
    /// Backlog, oldest pending age, lanes and owners, dead letters.
    Status,
    /// Inspect and handle dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Audit Kafka topics or NATS JetStream streams against the outbox: lost, reordered, duplicated
    /// messages per key.
    /// Exit 0 clean, 1 lost or reordered, 2 usage or connection error.
    Verify(verify::VerifyArgs),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// List dead letters, oldest first.
    List {
        /// At most this many (1 or more).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Put a dead letter back into the outbox (attempts reset).
    Retry {
        /// Message id.
        id: uuid::Uuid,
    },
    /// Delete a dead letter for good.
    Discard {
        /// Message id.
        id: uuid::Uuid,
    },
}

/// `RUST_LOG` (default `info`), except that async-nats' connection target never logs below
/// `debug`: at `trace` it prints the login line with the password.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match "async_nats::connection=debug".parse() {
        Ok(cap) => filter.add_directive(cap),
        Err(_) => filter,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Verify(args) = cli.command {
        std::process::exit(verify::main(&cli.overrides, args).await);
    }
    let s = resolve(&cli.overrides)?;
    match cli.command {
        Command::Run { migrate } => run(s, migrate).await,
        Command::Migrate => {
            for d in &s.databases {
                open::open(&d.url, d.schema.as_deref(), true, false)
                    .await
                    .with_context(|| format!("database {}", d.label()))?;
                println!("outbox schema is up to date ({}: {})", d.label(), redact_url(&d.url));
            }
            Ok(())
        }
        Command::Status => {
            for (i, d) in s.databases.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                status(d).await.with_context(|| format!("database {}", d.label()))?;
            }
            Ok(())
        }
        Command::DeadLetters(cmd) => {
            let d = s.one_database()?;
            let db = open::open(&d.url, d.schema.as_deref(), false, false).await?;
            match cmd {
                DeadLetters::List { limit } => {
                    let limit = limit as usize;
                    let list = db.store.dead_letters(limit).await?;
                    if list.is_empty() {
                        println!("no dead letters");
                    }
                    // A full list may be cut: say how many there are.
                    let total = match list.len() {
                        n if n == limit => Some(db.store.status().await?.dead_letters),
                        _ => None,
                    };
                    for d in list {
                        println!(
                            "{}  {}  topic={} key={} seq={} attempts={} {}\n    error: {}",
                            d.id,
                            d.dead_at.format("%Y-%m-%d %H:%M:%S"),
                            d.topic,
                            d.key.as_deref().unwrap_or("-"),
                            d.seq.map_or("-".into(), |s| s.to_string()),
                            d.attempts,
                            if d.parked { "PARKED (key waits)" } else { "skipped" },
                            d.error
                        );
                    }
                    if let Some(total) = total.filter(|t| *t > limit as i64) {
                        println!(
                            "the oldest {limit} of {total} dead letters (--limit {limit}); raise --limit for more"
                        );
                    }
                }
                DeadLetters::Retry { id } => {
                    anyhow::ensure!(db.store.retry_dead_letter(id).await?, "no dead letter {id}");
                    println!("{id} is back in the outbox");
                }
                DeadLetters::Discard { id } => {
                    anyhow::ensure!(db.store.discard_dead_letter(id).await?, "no dead letter {id}");
                    println!("{id} discarded");
                }
            }
            Ok(())
        }
        Command::Verify(_) => unreachable!("handled above"),
    }
}

/// `status` for one database.
async fn status(d: &settings::Database) -> anyhow::Result<()> {
    let db = open::open(&d.url, d.schema.as_deref(), false, false).await?;
    let st = db.store.status().await?;
    match &d.name {
        Some(name) => println!("database:      {name}: {} ({})", redact_url(&d.url), db.kind),
        None => println!("database:      {} ({})", redact_url(&d.url), db.kind),
    }
    println!("pending:       {}", st.pending);
    println!(
        "oldest:        {}",
        st.oldest_pending_age
            .map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64()))
    );
    println!("dead letters:  {}", st.dead_letters);
    println!("unowned lanes: {} of {}", st.unowned_lanes(), st.lanes.len());
    println!("lanes:");
    for l in &st.lanes {
        let now = chrono::Utc::now();
        match (&l.owner, l.expires_at) {
            (Some(o), Some(exp)) if exp > now => println!(
                "  {:>3}  epoch {:>5}  {}  (expires in {:.1}s)",
                l.lane,
                l.epoch,
                o,
                (exp - now).num_milliseconds() as f64 / 1000.0
            ),
            (Some(o), _) => println!("  {:>3}  epoch {:>5}  {}  (expired)", l.lane, l.epoch, o),
            (None, _) => println!("  {:>3}  epoch {:>5}  free", l.lane, l.epoch),
        }
    }
    Ok(())
}

async fn run(s: settings::Settings, migrate: bool) -> anyhow::Result<()> {
    let prometheus = admin::install_metrics().context("installing the metrics recorder")?;
    // Signal handlers first: a SIGTERM while a database is still unreachable ends the wait.
    let stop = CancellationToken::new();
    let signalled = shutdown_signal()?;
    tokio::spawn({
        let stop = stop.clone();
        async move {
            signalled.await;
            stop.cancel();
        }
    });
    for d in &s.databases {
        tracing::info!(database = d.label(), url = %redact_url(&d.url), "configuration");
    }
    // A broker that does not answer holds the connect for up to its timeout: a stop ends the wait.
    let publisher = tokio::select! {
        publisher = connect_broker(&s) => publisher?,
        _ = stop.cancelled() => {
            tracing::info!("stopped before the broker was reached");
            return Ok(());
        }
    };
    let views: Vec<Arc<admin::DatabaseView>> = s
        .databases
        .iter()
        .map(|d| admin::DatabaseView::new(d.label()))
        .collect();
    let listener = tokio::net::TcpListener::bind(&s.admin_listen)
        .await
        .with_context(|| format!("binding the admin endpoint {}", s.admin_listen))?;
    tracing::info!(addr = %s.admin_listen, "admin endpoint: / (console) /metrics /healthz /readyz");
    let state = Arc::new(admin::AdminState {
        prometheus,
        databases: views.clone(),
        lease_ttl: s.relay.lease_ttl,
        broker_unavailable: s.broker_unavailable,
        started: std::time::Instant::now(),
        token: s.admin_token.clone(),
    });
    let admin = tokio::spawn(admin::serve(listener, state));
    // One relay per database, each with its own lanes, leases and backoff: a database that is down
    // only stalls its own relay.
    let s = Arc::new(s);
    let mut relays = tokio::task::JoinSet::new();
    for (d, view) in s.databases.iter().zip(views) {
        let relay = serve_database(
            Arc::clone(&s),
            d.clone(),
            view,
            Arc::clone(&publisher),
            migrate,
            stop.clone(),
        );
        relays.spawn(relay);
    }
    let mut result = Ok(());
    while let Some(done) = relays.join_next().await {
        let done = done.context("a relay task panicked").and_then(|r| r);
        if let Err(e) = done {
            stop.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    admin.abort();
    result
}

/// Reaches one database (retrying while it is down), then runs its relay until `stop`.
async fn serve_database(
    s: Arc<settings::Settings>,
    d: settings::Database,
    view: Arc<admin::DatabaseView>,
    publisher: Arc<dyn outbox::Publisher>,
    migrate: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let label = d.label().to_owned();
    let Some(db) = open_retrying(&d, migrate, s.keep_published, &stop)
        .await
        .with_context(|| format!("database {label}"))?
    else {
        tracing::info!(database = %label, "stopped before the database was reached");
        return Ok(());
    };
    tracing::info!(database = %label, driver = db.kind, "database reached");
    let relay = Relay::new(Arc::clone(&db.store), publisher).config(s.relay.clone().name(d.name.clone()));
    view.connected(db.store, relay.health());
    relay
        .run_until(stop.cancelled_owned())
        .await
        .with_context(|| format!("database {label}"))
}

/// The publisher for the configured broker. Settings are logged without secrets.
async fn connect_broker(s: &settings::Settings) -> anyhow::Result<Arc<dyn outbox::Publisher>> {
    use settings::Broker;
    let broker = s.broker.as_ref().context(
        "no broker configured: add a [kafka] section (or --kafka bootstrap.servers=...), a [rabbitmq] or a [nats] section",
    )?;
    Ok(match broker {
        Broker::Kafka(kafka) => {
            tracing::info!(kafka = ?outbox_kafka::redacted(kafka), "broker: Kafka");
            Arc::new(KafkaPublisher::new(kafka.clone()).context("creating the Kafka producer")?)
        }
        Broker::Rabbitmq(cfg) => {
            tracing::info!(url = %outbox::redact::redact_url(&cfg.url), exchange = %cfg.exchange, "broker: RabbitMQ");
            use outbox_rabbitmq::{RabbitError, RabbitPublisher};
            match RabbitPublisher::connect(cfg.clone()).await {
                Ok(p) => Arc::new(p),
                // Like an unreachable database or NATS server: waited for, not a crash loop. The
                // relay's publishes answer Unavailable until it connects (`/readyz` says so).
                Err(RabbitError::Connect(e)) => {
                    tracing::warn!(error = %e, "RabbitMQ not reached at start; the relay keeps trying");
                    Arc::new(RabbitPublisher::unconnected(cfg.clone())?)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Broker::Nats(cfg) => {
            tracing::info!(url = %outbox::redact::redact_url(&cfg.url), subject_prefix = %cfg.subject_prefix, "broker: NATS JetStream");
            Arc::new(outbox_nats::NatsPublisher::connect(cfg.clone()).await?)
        }
    })
}

/// First and longest wait between attempts to reach the database at start-up.
const RECONNECT_BACKOFF: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(500),
    std::time::Duration::from_secs(10),
);

/// Connects (and migrates), retrying while the database is unreachable, like the relay itself keeps
/// retrying once it runs. Errors that waiting cannot fix (unsupported URL, bad settings, refused
/// login, failed migration) end the process. `None` when shutdown came first.
async fn open_retrying(
    d: &settings::Database,
    migrate: bool,
    keep_published: bool,
    stop: &CancellationToken,
) -> anyhow::Result<Option<open::Opened>> {
    let backoff = outbox::Backoff::new(RECONNECT_BACKOFF.0, RECONNECT_BACKOFF.1)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let delay = backoff.delay(attempt);
        let res = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            res = open::open(&d.url, d.schema.as_deref(), migrate, keep_published) => res,
        };
        match res {
            Ok(db) => return Ok(Some(db)),
            Err(open::OpenError::Outbox(outbox::Error::Database(e))) if unreachable(&e) => {
                tracing::warn!(database = d.label(), error = %e, retry_in = ?delay, "database not reachable; retrying");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Connection trouble that may pass: nothing listening, no connection within the timeout, the server
/// starting up or out of connection slots (SQLSTATE class 08, 57P03, 53300).
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c == "57P03" || c == "53300"),
        _ => false,
    }
}

/// Installs the SIGTERM handler now; the future completes on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    })
}
