//! PostgreSQL backend: `enqueue` into a `Transaction<'_, Postgres>`, the relay's [`PgStore`], the
//! embedded migrations and NOTIFY/LISTEN wake-up.

mod combine;
mod own;
mod sql;
mod store;

pub use store::PgStore;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool, Postgres, Row};

use crate::{Backend, Enqueued, Message, Options, Result, LANES};

/// The embedded PostgreSQL migrations (`migrations/postgres`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// Creates or upgrades the outbox schema. Safe to call from many processes at once (advisory lock)
/// and beside the application's own sqlx migrations (tracked in `outbox_schema_migrations`).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(sql::MIGRATIONS_LOCK).execute(&mut *tx).await?;
    apply_and_commit(tx).await
}

crate::migrate::apply_migrations!(Postgres, sql, MIGRATOR);

/// The longest key PostgreSQL takes, in bytes. Keys go into btree indexes (the key's counter, the
/// index of waiting rows with the seq, a parked dead letter's key, the inbox's records with the
/// source) whose entries are capped at 2,704 bytes: a longer key could be enqueued and then fail
/// the row's first failed attempt for ever. 2,048 leaves room for what is indexed beside it.
pub const MAX_KEY_BYTES: usize = 2048;

#[async_trait]
impl Backend for Postgres {
    const MAX_KEY_BYTES: usize = MAX_KEY_BYTES;
    async fn insert(conn: &mut PgConnection, msgs: &[Message], opts: &Options) -> Result<Vec<Enqueued>> {
        if let [msg] = msgs {
            return insert_one(conn, msg, opts).await.map(|e| vec![e]);
        }
        let n = msgs.len();
        let (mut lanes, mut ids, mut topics, mut payloads, mut headers, mut ats, mut delays, mut keys) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for m in msgs {
            lanes.push(m.lane(LANES));
            ids.push(m.id);
            topics.push(m.topic.as_str());
            payloads.push(m.payload.as_slice());
            headers.push(m.headers_column());
            ats.push(m.available_at);
            delays.push(m.delay_millis());
            keys.push(m.key.as_deref());
        }
        let rows: Vec<(uuid::Uuid, Option<i64>, i32)> = sqlx::query_as(sql::ENQUEUE_BATCH)
            .bind(&lanes)
            .bind(&ids)
            .bind(&topics)
            .bind(&payloads)
            .bind(&headers)
            .bind(&ats)
            .bind(&delays)
            .bind(&keys)
            .bind(opts.notify)
            .fetch_all(&mut *conn)
            .await?;
        // RETURNING order is not guaranteed: answer in the caller's order.
        let by_id: std::collections::HashMap<_, _> =
            rows.into_iter().map(|(id, seq, lane)| (id, (seq, lane))).collect();
        Ok(msgs
            .iter()
            .map(|m| {
                let (seq, lane) = by_id[&m.id];
                Enqueued { id: m.id, seq, lane }
            })
            .collect())
    }
}

async fn insert_one(conn: &mut PgConnection, m: &Message, opts: &Options) -> Result<Enqueued> {
    let lane = m.lane(LANES);
    let stmt = match (m.key.is_some(), opts.notify) {
        (false, false) => sql::ENQUEUE_UNKEYED,
        (false, true) => sql::ENQUEUE_UNKEYED_NOTIFY,
        (true, false) => sql::ENQUEUE_KEYED,
        (true, true) => sql::ENQUEUE_KEYED_NOTIFY,
    };
    let q = sqlx::query(stmt)
        .bind(lane)
        .bind(m.id)
        .bind(&m.topic)
        .bind(&m.payload)
        .bind(m.headers_column())
        .bind(m.available_at)
        .bind(m.delay_millis());
    let seq = match &m.key {
        Some(key) => Some(q.bind(key).fetch_one(&mut *conn).await?.try_get(0)?),
        None => {
            q.execute(&mut *conn).await?;
            None
        }
    };
    Ok(Enqueued { id: m.id, seq, lane })
}
