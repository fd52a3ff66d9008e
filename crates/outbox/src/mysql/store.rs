//! `MySqlStore`: the relay's operations on MySQL / MariaDB (statements live in `sql.rs`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::{Executor, MySql, MySqlPool, Transaction};
use uuid::Uuid;

use super::sql;
use crate::message::ClaimRow;
use crate::{DeadLetter, Delivered, Error, LaneInfo, Lease, Result, Status, Store, StoreAdmin, StoredMessage, Wakeups};

/// Rows per multi-statement round trip of `mark_published`.
const ROWS_PER_ROUND_TRIP: usize = 500;

/// The MySQL / MariaDB [`Store`]. Polled: [`Store::wakeups`] is `None` (no LISTEN on MySQL).
#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    keep_published: bool,
}

impl MySqlStore {
    /// A store on `pool`. Published rows are deleted.
    pub fn new(pool: MySqlPool) -> Self {
        MySqlStore {
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
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Opens a transaction holding the lease row in share mode, or fails with `StaleLease` (nothing
    /// changed). Until the transaction ends, no takeover of the lane can commit.
    async fn guarded(&self, lease: &Lease) -> Result<Transaction<'static, MySql>> {
        let mut tx = self.pool.begin().await?;
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

fn utc(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

/// Keys and owners are stored as bytes (compared byte for byte); they were written from Rust strings.
fn key_string(id: Uuid, key: Option<Vec<u8>>) -> Result<Option<String>> {
    key.map(|k| {
        String::from_utf8(k).map_err(|e| Error::CorruptRow {
            id,
            reason: format!("key: {e}"),
        })
    })
    .transpose()
}

#[async_trait]
impl Store for MySqlStore {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
        let mut tx = self.pool.begin().await?;
        let free: Vec<(i32, i64)> = sqlx::query_as(sql::ACQUIRE_CANDIDATES)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        // One row per statement: the rows are already locked by this transaction, so these never
        // wait.
        for (lane, _) in &free {
            sqlx::query(sql::ACQUIRE)
                .bind(owner)
                .bind(micros(ttl))
                .bind(lane)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(free
            .into_iter()
            .map(|(lane, epoch)| Lease {
                lane,
                epoch: epoch + 1,
                owner: owner.to_owned(),
            })
            .collect())
    }

    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
        sqlx::query(sql::HEARTBEAT)
            .bind(owner)
            .bind(micros(ttl))
            .execute(&self.pool)
            .await?;
        sqlx::query(sql::FORGET_RELAYS).execute(&self.pool).await?;
        let held: Vec<(i32, i64)> = sqlx::query_as(sql::RENEW_CANDIDATES)
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        let mut renewed = Vec::with_capacity(held.len());
        for (lane, epoch) in held {
            let r = sqlx::query(sql::RENEW)
                .bind(micros(ttl))
                .bind(lane)
                .bind(owner)
                .bind(epoch)
                .execute(&self.pool)
                .await?;
            // sqlx asks for matched rows (CLIENT_FOUND_ROWS), not only changed ones.
            if r.rows_affected() == 1 {
                renewed.push(Lease {
                    lane,
                    epoch,
                    owner: owner.to_owned(),
                });
            }
        }
        Ok(renewed)
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
        let rows: Vec<ClaimRow<Vec<u8>, NaiveDateTime>> = sqlx::query_as(sql::CLAIM)
            .bind(lease.lane)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(serde_json::to_string(in_flight)?)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| r.decode(|k| String::from_utf8(k).map_err(|e| e.to_string()), |t| Ok(utc(t))))
            .collect())
    }

    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()> {
        let mut tx = self.guarded(lease).await?;
        for chunk in done.chunks(ROWS_PER_ROUND_TRIP) {
            let stmts = sql::mark_published(lease.lane, chunk, self.keep_published);
            // A `&str` without arguments goes as a text query, which may hold many statements.
            (&mut *tx).execute(stmts.as_str()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
        let mut tx = self.guarded(lease).await?;
        sqlx::query(sql::MARK_FAILED)
            .bind(error)
            .bind(micros(retry_in))
            .bind(lease.lane)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
        let mut tx = self.guarded(lease).await?;
        sqlx::query(sql::DEAD_LETTER_COPY)
            .bind(error)
            .bind(park)
            .bind(lease.lane)
            .bind(pos)
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
impl StoreAdmin for MySqlStore {
    async fn status(&self) -> Result<Status> {
        let (pending, age): (i64, Option<i64>) = sqlx::query_as(sql::STATUS_BACKLOG).fetch_one(&self.pool).await?;
        let dead_letters: i64 = sqlx::query_scalar(sql::STATUS_DEAD).fetch_one(&self.pool).await?;
        let lanes: Vec<(i32, Option<Vec<u8>>, i64, Option<NaiveDateTime>)> =
            sqlx::query_as(sql::STATUS_LANES).fetch_all(&self.pool).await?;
        Ok(Status {
            pending,
            oldest_pending_age: age.map(|us| Duration::from_micros(us.max(0) as u64)),
            dead_letters,
            lanes: lanes
                .into_iter()
                .map(|(lane, owner, epoch, expires_at)| LaneInfo {
                    lane,
                    owner: owner.map(|o| String::from_utf8_lossy(&o).into_owned()),
                    epoch,
                    expires_at: expires_at.map(utc),
                })
                .collect(),
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        type Row = (
            Uuid,
            String,
            Option<Vec<u8>>,
            Option<i64>,
            i32,
            String,
            bool,
            NaiveDateTime,
        );
        let rows: Vec<Row> = sqlx::query_as(sql::DEAD_LETTERS)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(id, topic, key, seq, attempts, error, parked, dead_at)| {
                Ok(DeadLetter {
                    id,
                    topic,
                    key: key_string(id, key)?,
                    seq,
                    attempts,
                    error,
                    parked,
                    dead_at: utc(dead_at),
                })
            })
            .collect()
    }

    async fn retry_dead_letter(&self, id: Uuid) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if sqlx::query(sql::RETRY_DEAD_LETTER_LOCK)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(sql::RETRY_DEAD_LETTER_COPY)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::DISCARD_DEAD_LETTER).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
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
