//! `SqliteStore`: what the relay does on SQLite its own way (acquire, renew, claim, mark); the rest is
//! the body in [`crate::sql_store`] over this database's dialect (`sql.rs`: statements, decoding).

use std::time::Duration;

use sqlx::{Sqlite, SqlitePool};

use super::sql;
use crate::message::ClaimRow;
use crate::sql_store::{count, leases};
use crate::{Delivered, Lease, Result, StoredMessage, Wakeups};

crate::polled::polled_store!(
    /// The SQLite [`Store`](crate::Store). Polled: [`Store::wakeups`](crate::Store::wakeups) is
    /// `None` (no LISTEN in SQLite).
    SqliteStore,
    SqlitePool
);

crate::sql_store::store!(SqliteStore, Sqlite, sql);
crate::sql_store::guarded_writes!(SqliteStore, Sqlite, sql);
crate::sql_store::acquire_in_one_statement!(SqliteStore, sql, sorted_leases);

async fn renew(store: &SqliteStore, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
    let mut tx = store.pool.begin_with(sql::BEGIN_IMMEDIATE).await?;
    sqlx::query(sql::HEARTBEAT)
        .bind(owner)
        .bind(sql::span(ttl))
        .execute(&mut *tx)
        .await?;
    sqlx::query(sql::FORGET_RELAYS).execute(&mut *tx).await?;
    let rows: Vec<(i32, i64)> = sqlx::query_as(sql::RENEW)
        .bind(owner)
        .bind(sql::span(ttl))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(sorted_leases(owner, rows))
}

fn sorted_leases(owner: &str, mut rows: Vec<(i32, i64)>) -> Vec<Lease> {
    // RETURNING order is not guaranteed.
    rows.sort_unstable();
    leases(owner, rows)
}

async fn claim(store: &SqliteStore, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
    let rows: Vec<ClaimRow<sql::Text, sql::Time>> = sqlx::query_as(sql::CLAIM)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(count(limit))
        .bind(serde_json::to_string(in_flight)?)
        .fetch_all(&store.pool)
        .await?;
    Ok(rows.into_iter().map(|r| r.decode(sql::text, sql::time)).collect())
}

async fn mark_published(store: &SqliteStore, lease: &Lease, done: &[Delivered]) -> Result<()> {
    let mut statements = Vec::with_capacity(2);
    if store.keep_published {
        let rows: Vec<(i64, i32, i64)> = done.iter().map(|d| (d.pos, d.partition, d.offset)).collect();
        statements.push(
            sqlx::query(sql::KEEP_PUBLISHED)
                .bind(lease.lane)
                .bind(serde_json::to_string(&rows)?),
        );
    }
    let pos: Vec<i64> = done.iter().map(|d| d.pos).collect();
    statements.push(
        sqlx::query(sql::DELETE_PUBLISHED)
            .bind(lease.lane)
            .bind(serde_json::to_string(&pos)?),
    );
    run_guarded(store, lease, statements).await
}

fn wakeups(_: &SqliteStore) -> Option<&dyn Wakeups> {
    None
}

/// No counts of its own statements' transactions (writes, finished): the store keeps none.
fn count_probe(_: &SqliteStore) -> (Option<i64>, Option<i64>) {
    (None, None)
}
