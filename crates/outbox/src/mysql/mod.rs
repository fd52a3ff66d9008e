//! MySQL / MariaDB backend: `enqueue` into a `Transaction<'_, MySql>`, the relay's [`MySqlStore`] and
//! the embedded migrations. Needs MySQL 8.0.13+ or MariaDB 10.6+ (InnoDB, `SKIP LOCKED`).
//!
//! Same guarantees as the PostgreSQL backend:
//! - the per-key counter row in `outbox_keys` is taken (`INSERT ... ON DUPLICATE KEY UPDATE`, which
//!   locks it until the enqueueing transaction ends) before the message row is inserted, so per key
//!   the `AUTO_INCREMENT` position follows seq, and seq order is commit order;
//! - the relay claims by lane and lease, never by a cursor on ids or positions;
//! - every write of the relay checks its lease epoch in the same transaction, with the lease row
//!   locked in share mode, so a relay that lost its lane changes nothing ([`crate::Error::StaleLease`]).
//!
//! Times are `DATETIME(6)` in UTC from the server's `UTC_TIMESTAMP(6)` (delay, backoff, lease expiry),
//! whatever the session `time_zone`. `created_at` is the time of the enqueueing statement (MySQL has
//! no transaction-start clock).
//!
//! There is no LISTEN/NOTIFY on MySQL: [`MySqlStore`] keeps the default
//! [`Store::wakeups`](crate::Store::wakeups) (`None`), so the relay polls; a relay embedded in the
//! service is still woken in-process by [`Outbox::commit`](crate::Outbox::commit).
//! [`Options::notify`](crate::Options::notify) has no effect here.
//!
//! Business transactions are expected in REPEATABLE READ (the default) or READ COMMITTED. Under
//! SERIALIZABLE, InnoDB turns the plain read of the counters into a locking one.
//!
//! Enqueueing sets the session's `LAST_INSERT_ID()` (to the new message's position): read the id of
//! your own `AUTO_INCREMENT` insert from its query result, or before calling `enqueue`.

mod sql;
mod store;

pub use store::MySqlStore;

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use sqlx::{Connection, MySql, MySqlConnection, MySqlPool};

use crate::{Backend, Enqueued, Error, Message, Options, Result, LANES};

/// The embedded MySQL/MariaDB migrations (`migrations/mysql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/mysql");

/// Rows per multi-row `INSERT` (9 placeholders each; MySQL allows 65535 per statement).
const ROWS_PER_STATEMENT: usize = 500;
/// Bytes bound per statement (payloads, keys, topics, headers), well under the default
/// `max_allowed_packet` (16 MiB on MariaDB, 64 MiB on MySQL 8). A single larger message still
/// goes alone.
const BYTES_PER_STATEMENT: usize = 4 * 1024 * 1024;
/// Keys per counter statement.
const KEYS_PER_STATEMENT: usize = 1000;

/// Creates or upgrades the outbox schema. Safe to call from many processes at once (a named lock,
/// `GET_LOCK`, serializes them; MySQL DDL is not transactional) and beside the application's own
/// sqlx migrations (tracked in `outbox_schema_migrations`).
pub async fn migrate(pool: &MySqlPool) -> Result<()> {
    // The named lock belongs to the session. The connection is taken out of the pool, so that it
    // never goes back holding the lock: it is closed at the end, or dropped (and the server releases
    // the lock) if this future is cancelled.
    let mut conn = pool.acquire().await?.detach();
    let locked: Option<i64> = sqlx::query_scalar(sql::MIGRATIONS_LOCK).fetch_one(&mut conn).await?;
    if locked != Some(1) {
        return Err(Error::Migrate(sqlx::migrate::MigrateError::Source(
            "timed out waiting for the outbox migration lock (GET_LOCK)".into(),
        )));
    }
    let run = apply_migrations(&mut conn).await;
    // Closing the session releases the lock too; releasing it first is just polite.
    let _ = sqlx::query(sql::MIGRATIONS_UNLOCK).execute(&mut conn).await;
    let _ = conn.close().await;
    run
}

crate::migrate::apply_migrations!(MySql, sql, MIGRATOR);

#[async_trait]
impl Backend for MySql {
    async fn insert(conn: &mut MySqlConnection, msgs: &[Message], _opts: &Options) -> Result<Vec<Enqueued>> {
        // Counters first, keys in order (two batches lock them in the same order), then the rows.
        let counts = crate::message::key_counts(msgs);
        let last = take_seqs(conn, &counts).await?;
        // Each key's block of seqs is handed out in input order.
        let mut next: HashMap<&str, i64> = HashMap::with_capacity(counts.len());
        for (k, n) in &counts {
            let end = *last.get(*k).ok_or(Error::Database(sqlx::Error::RowNotFound))?;
            next.insert(*k, end - n + 1);
        }
        let out: Vec<Enqueued> = msgs
            .iter()
            .map(|m| {
                let seq = m.key.as_deref().map(|k| {
                    let s = next.get_mut(k).expect("every key was counted");
                    *s += 1;
                    *s - 1
                });
                Enqueued {
                    id: m.id,
                    seq,
                    lane: m.lane(LANES),
                }
            })
            .collect();

        let rows: Vec<(&Message, &Enqueued)> = msgs.iter().zip(&out).collect();
        let row_bytes = |(m, _): &(&Message, &Enqueued)| {
            m.payload.len()
                + m.topic.len()
                + m.key.as_ref().map_or(0, String::len)
                + m.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
        };
        for chunk in statements(&rows, ROWS_PER_STATEMENT, row_bytes) {
            let stmt = sql::enqueue(chunk.len());
            let mut q = sqlx::query(&stmt);
            for (m, e) in chunk {
                q = crate::polled::bind_row(q, m, e, m.available_at.map(|t| t.naive_utc()));
            }
            q.execute(&mut *conn).await?;
        }
        Ok(out)
    }
}

/// `items` cut into consecutive runs of at most `max` items and [`BYTES_PER_STATEMENT`] bytes (as
/// `bytes` counts them), one per statement; an item larger than that goes alone.
fn statements<T>(items: &[T], max: usize, bytes: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let b = bytes(item);
        if i > start && (i - start == max || size + b > BYTES_PER_STATEMENT) {
            out.push(&items[start..i]);
            (start, size) = (i, 0);
        }
        size += b;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Takes `n` seqs for each key; returns each key's last seq taken. The counter rows stay locked until
/// the caller's transaction ends.
async fn take_seqs(conn: &mut MySqlConnection, counts: &BTreeMap<&str, i64>) -> Result<HashMap<String, i64>> {
    let mut last = HashMap::with_capacity(counts.len());
    if let [(key, n)] = counts.iter().collect::<Vec<_>>()[..] {
        let r = sqlx::query(sql::TAKE_SEQS_ONE_KEY)
            .bind(*key)
            .bind(*key)
            .bind(*n)
            .bind(*n)
            .execute(&mut *conn)
            .await?;
        last.insert((*key).to_owned(), r.last_insert_id() as i64);
        return Ok(last);
    }
    let keys: Vec<(&str, i64)> = counts.iter().map(|(k, n)| (*k, *n)).collect();
    // Each key is bound twice in the counter statement.
    for chunk in statements(&keys, KEYS_PER_STATEMENT, |(k, _)| 2 * k.len()) {
        let stmt = sql::take_seqs(chunk.len());
        let mut q = sqlx::query(&stmt);
        for (k, n) in chunk {
            q = q.bind(*k).bind(*k).bind(*n);
        }
        q.execute(&mut *conn).await?;
        let stmt = sql::read_seqs(chunk.len());
        let mut q = sqlx::query_as::<_, (Vec<u8>, i64)>(&stmt);
        for (k, _) in chunk {
            q = q.bind(*k);
        }
        for (key, seq) in q.fetch_all(&mut *conn).await? {
            // Keys come from Rust strings, so they are UTF-8.
            last.insert(String::from_utf8_lossy(&key).into_owned(), seq);
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_cut_by_count_and_by_bytes_and_a_large_item_goes_alone() {
        let lens = |runs: Vec<&[usize]>| runs.iter().map(|r| r.len()).collect::<Vec<_>>();
        assert_eq!(lens(statements(&[1; 7], 3, |b| *b)), [3, 3, 1]);
        let half = BYTES_PER_STATEMENT / 2;
        assert_eq!(
            lens(statements(&[half, half, 1, 4 * half, 1], 10, |b| *b)),
            [2, 1, 1, 1]
        );
        assert!(statements(&[] as &[usize], 3, |b| *b).is_empty());
    }
}
