//! The database side of `verify`: read-only queries, one shape on every database. Each read is
//! one statement, so it sees one snapshot (a row moving from the outbox to the dead letters is
//! seen exactly once).

use std::collections::HashMap;

use super::audit::{Kept, KeyDb};

/// Per key: its counter (`c`), each pending seq (`p`), each dead-lettered seq (`d`). Keys are read
/// as bytes (MySQL keeps them as binary strings).
#[cfg(feature = "postgres")]
const PG_KEYS: &str = "\
SELECT convert_to(key, 'UTF8'), seq, 'c' FROM outbox_keys \
UNION ALL SELECT convert_to(key, 'UTF8'), seq, 'p' FROM outbox_messages WHERE key IS NOT NULL AND seq IS NOT NULL \
UNION ALL SELECT convert_to(key, 'UTF8'), seq, 'd' FROM outbox_dead_letters WHERE key IS NOT NULL AND seq IS NOT NULL";
/// [`PG_KEYS`] for MySQL and MariaDB.
#[cfg(feature = "mysql")]
const MYSQL_KEYS: &str = "\
SELECT `key`, seq, 'c' FROM outbox_keys \
UNION ALL SELECT `key`, seq, 'p' FROM outbox_messages WHERE `key` IS NOT NULL AND seq IS NOT NULL \
UNION ALL SELECT `key`, seq, 'd' FROM outbox_dead_letters WHERE `key` IS NOT NULL AND seq IS NOT NULL";
/// [`PG_KEYS`] for SQLite.
#[cfg(feature = "sqlite")]
const SQLITE_KEYS: &str = "\
SELECT CAST(key AS BLOB), seq, 'c' FROM outbox_keys \
UNION ALL SELECT CAST(key AS BLOB), seq, 'p' FROM outbox_messages WHERE key IS NOT NULL AND seq IS NOT NULL \
UNION ALL SELECT CAST(key AS BLOB), seq, 'd' FROM outbox_dead_letters WHERE key IS NOT NULL AND seq IS NOT NULL";

/// The source id the relay sends as `outbox-source`.
const SOURCE: &str = "SELECT id FROM outbox_source";

/// Kept published unkeyed rows of one topic and where the broker stored them.
#[cfg(feature = "postgres")]
const PG_KEPT: &str = "SELECT id, kafka_partition, kafka_offset FROM outbox_published WHERE key IS NULL AND topic = $1";
/// [`PG_KEPT`] for MySQL and SQLite.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
const KEPT: &str = "SELECT id, kafka_partition, kafka_offset FROM outbox_published WHERE key IS NULL AND topic = ?";

/// A read-only connection to the outbox database.
pub(crate) enum Db {
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgPool),
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool),
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
}

/// Everything `verify` needs from the database, read before the topics.
pub(crate) struct Snapshot {
    /// The source id.
    pub(crate) source: String,
    /// Per key: counter, pending and dead-lettered seqs.
    pub(crate) keys: HashMap<Vec<u8>, KeyDb>,
    /// Kept published unkeyed rows of the verified topics.
    pub(crate) kept: HashMap<uuid::Uuid, Kept>,
}

/// Runs `$body` with `pool` bound to whichever pool `$db` holds and `$keys`/`$kept` to its SQL.
macro_rules! with_pool {
    ($db:expr, |$pool:ident, $keys:ident, $kept:ident| $body:expr) => {
        match $db {
            #[cfg(feature = "postgres")]
            Db::Pg($pool) => {
                let ($keys, $kept) = (PG_KEYS, PG_KEPT);
                $body
            }
            #[cfg(feature = "mysql")]
            Db::MySql($pool) => {
                let ($keys, $kept) = (MYSQL_KEYS, KEPT);
                $body
            }
            #[cfg(feature = "sqlite")]
            Db::Sqlite($pool) => {
                let ($keys, $kept) = (SQLITE_KEYS, KEPT);
                $body
            }
        }
    };
}

impl Db {
    /// Connects to `url`; `schema` (PostgreSQL, validated by the settings) is the `search_path`.
    /// One connection, no statement timeout: the key query reads whole tables.
    pub(crate) async fn connect(url: &str, schema: Option<&str>) -> anyhow::Result<Db> {
        let scheme = url.split(':').next().unwrap_or_default();
        let redacted = outbox::redact::redact_url(url);
        let fail = |e: sqlx::Error| anyhow::anyhow!("connecting to {redacted}: {e}");
        match scheme {
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => {
                let mut opts: sqlx::postgres::PgConnectOptions = url.parse().map_err(fail)?;
                if let Some(schema) = schema {
                    opts = opts.options([("search_path", schema)]);
                }
                Ok(Db::Pg(pool().connect_with(opts).await.map_err(fail)?))
            }
            #[cfg(feature = "mysql")]
            "mysql" | "mariadb" => {
                let opts: sqlx::mysql::MySqlConnectOptions =
                    url.replacen("mariadb:", "mysql:", 1).parse().map_err(fail)?;
                Ok(Db::MySql(pool().connect_with(opts).await.map_err(fail)?))
            }
            #[cfg(feature = "sqlite")]
            "sqlite" => {
                let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().map_err(fail)?;
                Ok(Db::Sqlite(
                    pool().connect_with(opts.read_only(true)).await.map_err(fail)?,
                ))
            }
            _ => anyhow::bail!("unsupported database URL {redacted}: expected postgres://, mysql:// or sqlite:"),
        }
    }

    /// Reads the source id, every key's state and the kept unkeyed rows of `topics`.
    pub(crate) async fn snapshot(&self, topics: &[String]) -> anyhow::Result<Snapshot> {
        with_pool!(self, |pool, keys_sql, kept_sql| {
            let source: String = sqlx::query_scalar(SOURCE)
                .fetch_one(pool)
                .await
                .map_err(|e| anyhow::anyhow!("reading outbox_source (is the schema migrated?): {e}"))?;
            let rows: Vec<(Vec<u8>, i64, String)> = sqlx::query_as(keys_sql)
                .fetch_all(pool)
                .await
                .map_err(|e| anyhow::anyhow!("reading the keys' counters: {e}"))?;
            let mut kept = HashMap::new();
            for (t, topic) in topics.iter().enumerate() {
                let rows: Vec<(uuid::Uuid, i32, i64)> = sqlx::query_as(kept_sql)
                    .bind(topic)
                    .fetch_all(pool)
                    .await
                    .map_err(|e| anyhow::anyhow!("reading outbox_published: {e}"))?;
                kept.extend(rows.into_iter().map(|(id, partition, offset)| {
                    let k = Kept {
                        topic: t,
                        partition,
                        offset,
                        seen: false,
                    };
                    (id, k)
                }));
            }
            Ok(Snapshot {
                source,
                keys: by_key(rows),
                kept,
            })
        })
    }
}

fn pool<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
}

/// Folds the key query's rows into one entry per key, seqs sorted.
fn by_key(rows: Vec<(Vec<u8>, i64, String)>) -> HashMap<Vec<u8>, KeyDb> {
    let mut keys: HashMap<Vec<u8>, KeyDb> = HashMap::new();
    for (key, seq, kind) in rows {
        let k = keys.entry(key).or_default();
        match kind.as_str() {
            "c" => k.counter = seq,
            "p" => k.pending.push(seq),
            _ => k.dead.push(seq),
        }
    }
    for k in keys.values_mut() {
        k.pending.sort_unstable();
        k.dead.sort_unstable();
    }
    keys
}
