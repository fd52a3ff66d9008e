//! Opens the store a database URL names: `postgres://`, `mysql://` (also MariaDB) or `sqlite:`.

use std::sync::Arc;
use std::time::Duration;

use outbox::Store;

/// A connected store, chosen by URL scheme.
pub(crate) struct Opened {
    /// The store.
    pub(crate) store: Arc<dyn Store>,
    /// `postgres`, `mysql` or `sqlite`.
    pub(crate) kind: &'static str,
}

/// Errors opening a database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum OpenError {
    /// The URL scheme is not one we know, or its driver was not compiled in.
    #[error("unsupported database URL {0:?}: expected postgres://, mysql:// or sqlite: (compiled in: {1})")]
    Unsupported(String, String),
    /// Connecting or migrating failed.
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
}

fn compiled() -> String {
    let all = [
        ("postgres", cfg!(feature = "postgres")),
        ("mysql", cfg!(feature = "mysql")),
        ("sqlite", cfg!(feature = "sqlite")),
    ];
    all.iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The relay's pool settings, the same on every database: a bounded wait for a connection, so an
/// unreachable database fails instead of hanging.
fn pool<DB: sqlx::Database>(max: u32) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
}

/// The migration (if asked, after `$prepare`) and the store, the same steps on every database.
macro_rules! opened {
    ($pool:expr, $kind:literal, $module:ident, $store:ident, $migrate:expr, $keep:expr) => {
        opened!($pool, $kind, $module, $store, $migrate, $keep, |_| async {
            Ok::<(), sqlx::Error>(())
        })
    };
    ($pool:expr, $kind:literal, $module:ident, $store:ident, $migrate:expr, $keep:expr, $prepare:expr) => {{
        let pool = $pool.map_err(outbox::Error::from)?;
        if $migrate {
            ($prepare)(&pool).await.map_err(outbox::Error::from)?;
            outbox::$module::migrate(&pool).await?;
        }
        Ok(Opened {
            store: Arc::new(outbox::$module::$store::new(pool).keep_published($keep)),
            kind: $kind,
        })
    }};
}

/// Connects to `url` and optionally runs the outbox migrations. `schema` (PostgreSQL, checked by
/// `settings` to be a plain identifier) becomes the connections' `search_path`, and `migrate`
/// creates it when missing.
pub(crate) async fn open(
    url: &str,
    schema: Option<&str>,
    migrate: bool,
    keep_published: bool,
) -> Result<Opened, OpenError> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let opts: sqlx::postgres::PgConnectOptions = url.parse().map_err(outbox::Error::from)?;
            // A statement never waits forever on a lock or a stuck query.
            // JIT off: on a large backlog PostgreSQL would JIT-compile a statement that scans the
            // outbox (60-140 ms each, BENCHMARKS.md). The claims run on the store's own connections,
            // which copy these options and turn JIT off themselves; this keeps it off for the
            // daemon's other statements (backlog counts, lease upkeep).
            let mut opts = opts.options([("statement_timeout", "30s"), ("lock_timeout", "10s"), ("jit", "off")]);
            if let Some(schema) = schema {
                opts = opts.options([("search_path", schema)]);
            }
            let create_schema = |pool: &sqlx::PgPool| {
                let pool = pool.clone();
                async move {
                    match schema {
                        Some(schema) => sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                            .execute(&pool)
                            .await
                            .map(drop),
                        None => Ok(()),
                    }
                }
            };
            opened!(
                pool(16).connect_with(opts).await,
                "postgres",
                postgres,
                PgStore,
                migrate,
                keep_published,
                create_schema
            )
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => {
            let opts: sqlx::mysql::MySqlConnectOptions = url
                .replacen("mariadb:", "mysql:", 1)
                .parse()
                .map_err(outbox::Error::from)?;
            opened!(
                pool(16).connect_with(opts).await,
                "mysql",
                mysql,
                MySqlStore,
                migrate,
                keep_published
            )
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
            let opts: SqliteConnectOptions = url.parse().map_err(outbox::Error::from)?;
            let opts = opts
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30));
            opened!(
                pool(8).connect_with(opts).await,
                "sqlite",
                sqlite,
                SqliteStore,
                migrate,
                keep_published
            )
        }
        _ => Err(OpenError::Unsupported(outbox::redact::redact_url(url), compiled())),
    }
}
