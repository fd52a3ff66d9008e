//! `SqliteStore`: the relay's operations on SQLite (statements live in `sql.rs`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

use super::sql;
use crate::message::ClaimRow;
use crate::{DeadLetter, Delivered, Error, LaneInfo, Lease, Result, Status, Store, StoreAdmin, StoredMessage, Wakeups};

/// The SQLite [`Store`]. Polled: [`Store::wakeups`] is `None` (no LISTEN in SQLite).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    keep_published: bool,
}

impl SqliteStore {
    /// A store on `pool`. Published rows are deleted.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteStore {
            pool,
            keep_published: false,
        }
    }

    /// Keep published rows in `outbox_published` with their partition and offset (audit) instead
    /// of deleting them. Defaults to false.
    pub fn keep_published(mut self, keep: bool) -> Self {
        self.keep_published = keep;
        self
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens a write transaction in which the lease holds, or fails with `StaleLease` (nothing
    /// changed). SQLite has one writer: until the transaction ends, no takeover can happen.
    async fn guarded(&self, lease: &Lease) -> Result<Transaction<'static, Sqlite>> {
        let mut tx = self.pool.begin_with(sql::BEGIN_WRITE).await?;
        let held = sqlx::query(sql::LEASE_HELD)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .fetch_optional(&mut *tx)
            .await?;
        if held.is_none() {
            tx.rollback().await?;
            return Err(Error::StaleLease {
                lane: lease.lane,
                epoch: lease.epoch,
            });
        }
        Ok(tx)
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A stored time (microseconds since the Unix epoch).
fn time(id: Uuid, us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| Error::CorruptRow {
        id,
        reason: format!("time out of range: {us}"),
    })
}

fn to_leases(owner: &str, mut rows: Vec<(i32, i64)>) -> Vec<Lease> {
    // RETURNING order is not guaranteed.
    rows.sort_unstable();
    rows.into_iter()
        .map(|(lane, epoch)| Lease {
            lane,
            epoch,
            owner: owner.to_owned(),
        })
        .collect()
}

#[async_trait]
impl Store for SqliteStore {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(sql::ACQUIRE)
            .bind(owner)
            .bind(max as i64)
            .bind(micros(ttl))
            .fetch_all(&self.pool)
            .await?;
        Ok(to_leases(owner, rows))
    }

    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
        let mut tx = self.pool.begin_with(sql::BEGIN_WRITE).await?;
        sqlx::query(sql::HEARTBEAT)
            .bind(owner)
            .bind(micros(ttl))
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::FORGET_RELAYS).execute(&mut *tx).await?;
        let rows: Vec<(i32, i64)> = sqlx::query_as(sql::RENEW)
            .bind(owner)
            .bind(micros(ttl))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(to_leases(owner, rows))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        sqlx::query(sql::RELEASE)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn leave(&self, owner: &str) -> Result<()> {
        sqlx::query(sql::LEAVE).bind(owner).execute(&self.pool).await?;
        Ok(())
    }

    async fn live_owners(&self) -> Result<usize> {
        let n: i64 = sqlx::query_scalar(sql::LIVE_OWNERS).fetch_one(&self.pool).await?;
        Ok(n as usize)
    }

    async fn claim(&self, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
        let rows: Vec<ClaimRow<String, i64>> = sqlx::query_as(sql::CLAIM)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(serde_json::to_string(in_flight)?)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                r.decode(Ok, |us| {
                    DateTime::from_timestamp_micros(us).ok_or_else(|| format!("out of range: {us}"))
                })
            })
            .collect())
    }

    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()> {
        let mut tx = self.guarded(lease).await?;
        if self.keep_published {
            let rows: Vec<(i64, i32, i64)> = done.iter().map(|d| (d.pos, d.partition, d.offset)).collect();
            sqlx::query(sql::KEEP_PUBLISHED)
                .bind(lease.lane)
                .bind(serde_json::to_string(&rows)?)
                .execute(&mut *tx)
                .await?;
        }
        let pos: Vec<i64> = done.iter().map(|d| d.pos).collect();
        sqlx::query(sql::DELETE_PUBLISHED)
            .bind(lease.lane)
            .bind(serde_json::to_string(&pos)?)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
        let mut tx = self.guarded(lease).await?;
        sqlx::query(sql::MARK_FAILED)
            .bind(lease.lane)
            .bind(pos)
            .bind(error)
            .bind(micros(retry_in))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
        let mut tx = self.guarded(lease).await?;
        sqlx::query(sql::DEAD_LETTER_COPY)
            .bind(lease.lane)
            .bind(pos)
            .bind(error)
            .bind(park)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::DEAD_LETTER_DELETE)
            .bind(lease.lane)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    fn wakeups(&self) -> Option<&dyn Wakeups> {
        None
    }
}

#[async_trait]
impl StoreAdmin for SqliteStore {
    async fn status(&self) -> Result<Status> {
        let (pending, age): (i64, Option<i64>) = sqlx::query_as(sql::STATUS_BACKLOG).fetch_one(&self.pool).await?;
        let dead_letters: i64 = sqlx::query_scalar(sql::STATUS_DEAD).fetch_one(&self.pool).await?;
        let lanes: Vec<(i32, Option<String>, i64, Option<i64>)> =
            sqlx::query_as(sql::STATUS_LANES).fetch_all(&self.pool).await?;
        Ok(Status {
            pending,
            oldest_pending_age: age.map(|us| Duration::from_micros(us.max(0) as u64)),
            dead_letters,
            lanes: lanes
                .into_iter()
                .map(|(lane, owner, epoch, expires_at)| LaneInfo {
                    lane,
                    owner,
                    epoch,
                    expires_at: expires_at.and_then(DateTime::from_timestamp_micros),
                })
                .collect(),
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        type Row = (Uuid, String, Option<String>, Option<i64>, i32, String, bool, i64);
        let rows: Vec<Row> = sqlx::query_as(sql::DEAD_LETTERS)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(id, topic, key, seq, attempts, error, parked, dead_at)| {
                Ok(DeadLetter {
                    id,
                    topic,
                    key,
                    seq,
                    attempts,
                    error,
                    parked,
                    dead_at: time(id, dead_at)?,
                })
            })
            .collect()
    }

    async fn retry_dead_letter(&self, id: Uuid) -> Result<bool> {
        let mut tx = self.pool.begin_with(sql::BEGIN_WRITE).await?;
        sqlx::query(sql::RETRY_DEAD_LETTER_COPY)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query(sql::DISCARD_DEAD_LETTER).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    async fn discard_dead_letter(&self, id: Uuid) -> Result<bool> {
        let r = sqlx::query(sql::DISCARD_DEAD_LETTER)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn cleanup_published(&self, older_than: Duration, batch: usize) -> Result<u64> {
        let r = sqlx::query(sql::CLEANUP_PUBLISHED)
            .bind(micros(older_than))
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
