//! SQLite backend: `enqueue` into a `Transaction<'_, Sqlite>`, the relay's [`SqliteStore`] and the
//! embedded migrations. Needs SQLite 3.38+ (`RETURNING`, upsert, JSON functions; sqlx bundles a newer
//! one).
//!
//! Same guarantees as the PostgreSQL backend, most of them for free: SQLite runs one write
//! transaction at a time, so the per-key counter row (taken before the message row is inserted)
//! gives seq order = position order = commit order, and a lease check followed by a write inside one
//! `BEGIN IMMEDIATE` transaction cannot be overtaken by a takeover. There is no `FOR UPDATE` /
//! `SKIP LOCKED` in SQLite and none is needed: the claim reads one snapshot, and the lease gives the
//! lane to a single relay. Every write of the relay checks its lease epoch
//! ([`crate::Error::StaleLease`] when it is gone, nothing changed).
//!
//! Times are INTEGER microseconds since the Unix epoch (UTC), compared numerically, from SQLite's own
//! clock. `created_at` is the time of the enqueueing statement.
//!
//! Use a file database in WAL mode with a busy timeout, so that the relay reads while services write
//! and writers wait for each other instead of failing with `SQLITE_BUSY`:
//!
//! ```no_run
//! # async fn f() -> outbox::Result<()> {
//! use std::time::Duration;
//! use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
//! let opts = "sqlite://app.db?mode=rwc".parse::<SqliteConnectOptions>()?
//!     .journal_mode(SqliteJournalMode::Wal)
//!     .busy_timeout(Duration::from_secs(30));
//! let pool = SqlitePoolOptions::new().connect_with(opts).await?;
//! outbox::sqlite::migrate(&pool).await?;
//! // A business transaction that reads before it writes should start as a write transaction, or
//! // SQLite may refuse its first write (SQLITE_BUSY) when another writer committed meanwhile.
//! let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
//! outbox::enqueue(&mut tx, &outbox::Message::new("order.placed.v1", "42").key("order-42")).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! There is no LISTEN/NOTIFY in SQLite: [`SqliteStore`] keeps the default
//! [`Store::wakeups`](crate::Store::wakeups) (`None`), so the relay polls; a relay embedded in the
//! service is still woken in-process by [`Outbox::commit`](crate::Outbox::commit).
//! [`Options::notify`](crate::Options::notify) has no effect here.

mod sql;
mod store;

pub use store::SqliteStore;

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use crate::{Backend, Enqueued, Error, Message, Options, Result, LANES};

/// The embedded SQLite migrations (`migrations/sqlite`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// Rows per multi-row `INSERT` (9 parameters each; SQLite allows 32766 per statement).
const ROWS_PER_STATEMENT: usize = 1000;
/// Keys per counter statement (2 parameters each).
const KEYS_PER_STATEMENT: usize = 1000;

/// Creates or upgrades the outbox schema, in one write transaction. Safe to call from many processes
/// at once (they take turns on SQLite's write lock) and beside the application's own sqlx migrations
/// (tracked in `outbox_schema_migrations`).
pub async fn migrate(pool: &SqlitePool) -> Result<()> {
    apply_and_commit(pool.begin_with(sql::BEGIN_IMMEDIATE).await?).await
}

crate::migrate::apply_migrations!(Sqlite, sql, MIGRATOR);

#[async_trait]
impl Backend for Sqlite {
    async fn insert(conn: &mut SqliteConnection, msgs: &[Message], _opts: &Options) -> Result<Vec<Enqueued>> {
        // Counters first, then the rows. The first write takes SQLite's write lock for the rest of
        // the caller's transaction, so nobody else writes (or takes seqs) until it ends.
        let counts = crate::message::key_counts(msgs);
        let keys: Vec<(&str, i64)> = counts.into_iter().collect();
        let mut next: HashMap<String, i64> = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(KEYS_PER_STATEMENT) {
            let stmt = sql::take_seqs(chunk.len());
            let mut q = sqlx::query_as::<_, (String, i64)>(&stmt);
            for (k, n) in chunk {
                q = q.bind(*k).bind(*n);
            }
            for (key, last) in q.fetch_all(&mut *conn).await? {
                let n = chunk.iter().find(|(k, _)| *k == key).map_or(0, |(_, n)| *n);
                // Each key's block of seqs is handed out in input order.
                next.insert(key, last - n + 1);
            }
        }
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let seq = match m.key.as_deref() {
                None => None,
                Some(k) => {
                    let s = next.get_mut(k).ok_or(Error::Database(sqlx::Error::RowNotFound))?;
                    *s += 1;
                    Some(*s - 1)
                }
            };
            out.push(Enqueued {
                id: m.id,
                seq,
                lane: m.lane(LANES),
            });
        }

        for (ms, es) in msgs.chunks(ROWS_PER_STATEMENT).zip(out.chunks(ROWS_PER_STATEMENT)) {
            let stmt = sql::enqueue(ms.len());
            let mut q = sqlx::query(&stmt);
            for (m, e) in ms.iter().zip(es) {
                q = crate::polled::bind_row(q, m, e, m.available_at.map(|t| t.timestamp_micros()));
            }
            q.execute(&mut *conn).await?;
        }
        Ok(out)
    }
}
