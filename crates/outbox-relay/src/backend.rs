//! Opens the store a database URL names: `postgres://`, `mysql://` (also MariaDB) or `sqlite:`.

use std::sync::Arc;
use std::time::Duration;

use outbox::Store;

/// A connected store, chosen by URL scheme.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// `postgres`, `mysql` or `sqlite`.
    pub kind: &'static str,
}

/// Errors opening a database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL scheme is not one we know, or its backend was not compiled in.
    #[error("unsupported database URL {0:?}: expected postgres://, mysql:// or sqlite: (compiled backends: {1})")]
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

/// Connects to `url` (timeouts set so an unreachable database fails instead of hanging) and
/// optionally runs the outbox migrations.
pub async fn open(url: &str, migrate: bool, keep_published: bool) -> Result<Opened, OpenError> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
            let opts: PgConnectOptions = url.parse().map_err(outbox::Error::from)?;
            let opts = opts.options([("statement_timeout", "30s"), ("lock_timeout", "10s")]);
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(outbox::Error::from)?;
            if migrate {
                outbox::postgres::migrate(&pool).await?;
            }
            let store = outbox::postgres::PgStore::new(pool).keep_published(keep_published);
            Ok(Opened {
                store: Arc::new(store),
                kind: "postgres",
            })
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => {
            use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
            let opts: MySqlConnectOptions = url
                .replacen("mariadb:", "mysql:", 1)
                .parse()
                .map_err(outbox::Error::from)?;
            let pool = MySqlPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(outbox::Error::from)?;
            if migrate {
                outbox::mysql::migrate(&pool).await?;
            }
            let store = outbox::mysql::MySqlStore::new(pool).keep_published(keep_published);
            Ok(Opened {
                store: Arc::new(store),
                kind: "mysql",
            })
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
            let opts: SqliteConnectOptions = url.parse().map_err(outbox::Error::from)?;
            let opts = opts
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(outbox::Error::from)?;
            if migrate {
                outbox::sqlite::migrate(&pool).await?;
            }
            let store = outbox::sqlite::SqliteStore::new(pool).keep_published(keep_published);
            Ok(Opened {
                store: Arc::new(store),
                kind: "sqlite",
            })
        }
        _ => Err(OpenError::Unsupported(crate::settings::redact_url(url), compiled())),
    }
}
