//! `MySqlStore`: what the relay does on MySQL / MariaDB its own way (acquire, renew, claim, mark);
//! the rest is the body in [`crate::sql_store`] over this database's dialect (`sql.rs`: statements,
//! decoding).

use std::time::Duration;

use sqlx::{Executor, MySql, MySqlPool};

use super::sql;
use crate::message::ClaimRow;
use crate::sql_store::{count, leases};
use crate::{Delivered, Lease, Result, StoredMessage, Wakeups};

/// Rows per multi-statement round trip of `mark_published`.
const ROWS_PER_ROUND_TRIP: usize = 500;

crate::polled::polled_store!(
    /// The MySQL / MariaDB [`Store`](crate::Store). Polled: [`Store::wakeups`](crate::Store::wakeups)
    /// is `None` (no LISTEN on MySQL).
    MySqlStore,
    MySqlPool
);

crate::sql_store::store!(MySqlStore, MySql, sql);
crate::sql_store::guarded_writes!(MySqlStore, MySql, sql);

async fn acquire(store: &MySqlStore, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
    let mut tx = store.pool.begin().await?;
    let free: Vec<(i32, i64)> = sqlx::query_as(sql::ACQUIRE_CANDIDATES)
        .bind(count(max))
        .fetch_all(&mut *tx)
        .await?;
    // One row per statement: the rows are already locked by this transaction, so these never
    // wait.
    for (lane, _) in &free {
        sqlx::query(sql::ACQUIRE)
            .bind(owner)
            .bind(sql::span(ttl))
            .bind(lane)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(leases(
        owner,
        free.into_iter().map(|(lane, epoch)| (lane, epoch + 1)).collect(),
    ))
}

async fn renew(store: &MySqlStore, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
    sqlx::query(sql::HEARTBEAT)
        .bind(owner)
        .bind(sql::span(ttl))
        .execute(&store.pool)
        .await?;
    sqlx::query(sql::FORGET_RELAYS).execute(&store.pool).await?;
    let held: Vec<(i32, i64)> = sqlx::query_as(sql::RENEW_CANDIDATES)
        .bind(owner)
        .fetch_all(&store.pool)
        .await?;
    let mut renewed = Vec::with_capacity(held.len());
    for (lane, epoch) in held {
        let r = sqlx::query(sql::RENEW)
            .bind(sql::span(ttl))
            .bind(lane)
            .bind(owner)
            .bind(epoch)
            .execute(&store.pool)
            .await?;
        // sqlx asks for matched rows (CLIENT_FOUND_ROWS), not only changed ones.
        if r.rows_affected() == 1 {
            renewed.push((lane, epoch));
        }
    }
    Ok(leases(owner, renewed))
}

async fn claim(store: &MySqlStore, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
    let rows: Vec<ClaimRow<sql::Text, sql::Time>> = sqlx::query_as(sql::CLAIM)
        .bind(lease.lane)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(serde_json::to_string(in_flight)?)
        .bind(count(limit))
        .fetch_all(&store.pool)
        .await?;
    Ok(rows.into_iter().map(|r| r.decode(sql::text, sql::time)).collect())
}

async fn mark_published(store: &MySqlStore, lease: &Lease, done: &[Delivered]) -> Result<()> {
    let mut tx = guarded(store, lease).await?;
    for chunk in done.chunks(ROWS_PER_ROUND_TRIP) {
        let stmts = sql::mark_published(lease.lane, chunk, store.keep_published);
        // A `&str` without arguments goes as a text query, which may hold many statements.
        (&mut *tx).execute(stmts.as_str()).await?;
    }
    tx.commit().await?;
    Ok(())
}

fn wakeups(_: &MySqlStore) -> Option<&dyn Wakeups> {
    None
}

/// No counts of its own statements' transactions (writes, finished): the store keeps none.
fn count_probe(_: &MySqlStore) -> (Option<i64>, Option<i64>) {
    (None, None)
}
