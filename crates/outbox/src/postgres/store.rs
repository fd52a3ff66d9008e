//! `PgStore`: the relay's operations on PostgreSQL (statements live in `sql.rs`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgListener, PgPool};
use uuid::Uuid;

use super::sql;
use crate::message::ClaimRow;
use crate::{DeadLetter, Delivered, Error, LaneInfo, Lease, Result, Status, Store, StoreAdmin, StoredMessage, Wakeups};

/// The PostgreSQL [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    keep_published: bool,
    claim_sql: String,
    mark_sql: String,
    failed_sql: String,
    dead_sql: String,
}

impl PgStore {
    /// A store on `pool`. Published rows are deleted.
    pub fn new(pool: PgPool) -> Self {
        PgStore {
            pool,
            keep_published: false,
            claim_sql: sql::claim(),
            mark_sql: sql::mark_published_delete(),
            failed_sql: sql::mark_failed(),
            dead_sql: sql::dead_letter(),
        }
    }

    /// Keep published rows in `outbox_published` with their partition and offset (audit) instead
    /// of deleting them. Defaults to false.
    pub fn keep_published(mut self, keep: bool) -> Self {
        self.keep_published = keep;
        self.mark_sql = if keep {
            sql::mark_published_keep()
        } else {
            sql::mark_published_delete()
        };
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn held(lease: &Lease, (held, _): (bool, i64)) -> Result<()> {
    if held {
        Ok(())
    } else {
        Err(Error::StaleLease {
            lane: lease.lane,
            epoch: lease.epoch,
        })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(sql::ACQUIRE)
            .bind(owner)
            .bind(max as i64)
            .bind(millis(ttl))
            .fetch_all(&self.pool)
            .await?;
        Ok(to_leases(owner, rows))
    }

    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(sql::RENEW)
            .bind(owner)
            .bind(millis(ttl))
            .fetch_all(&self.pool)
            .await?;
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
        // JIT off for this statement only, whatever the pool's settings: on a large backlog the
        // claim's cost estimate passes `jit_above_cost` and every claim would pay 60-140 ms of LLVM
        // compilation (BENCHMARKS.md, figure 2).
        let mut tx = self.pool.begin().await?;
        sqlx::query(sql::CLAIM_NO_JIT).execute(&mut *tx).await?;
        let rows: Vec<ClaimRow<String, DateTime<Utc>>> = sqlx::query_as(&self.claim_sql)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(limit as i64)
            .bind(in_flight)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|r| r.decode(Ok, Ok)).collect())
    }

    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()> {
        let pos: Vec<i64> = done.iter().map(|d| d.pos).collect();
        let mut q = sqlx::query_as(&self.mark_sql)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(&pos);
        if self.keep_published {
            let parts: Vec<i32> = done.iter().map(|d| d.partition).collect();
            let offs: Vec<i64> = done.iter().map(|d| d.offset).collect();
            q = q.bind(parts).bind(offs);
        }
        held(lease, q.fetch_one(&self.pool).await?)
    }

    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
        let r = sqlx::query_as(&self.failed_sql)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(pos)
            .bind(error)
            .bind(millis(retry_in))
            .fetch_one(&self.pool)
            .await?;
        held(lease, r)
    }

    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
        let r = sqlx::query_as(&self.dead_sql)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(pos)
            .bind(error)
            .bind(park)
            .fetch_one(&self.pool)
            .await?;
        held(lease, r)
    }

    fn wakeups(&self) -> Option<&dyn Wakeups> {
        Some(self)
    }
}

#[async_trait]
impl StoreAdmin for PgStore {
    async fn status(&self) -> Result<Status> {
        let (pending, age): (i64, Option<f64>) = sqlx::query_as(sql::STATUS_BACKLOG).fetch_one(&self.pool).await?;
        let dead_letters: i64 = sqlx::query_scalar(sql::STATUS_DEAD).fetch_one(&self.pool).await?;
        let lanes: Vec<(i32, Option<String>, i64, Option<DateTime<Utc>>)> =
            sqlx::query_as(sql::STATUS_LANES).fetch_all(&self.pool).await?;
        Ok(Status {
            pending,
            oldest_pending_age: age.map(|s| Duration::from_secs_f64(s.max(0.0))),
            dead_letters,
            lanes: lanes
                .into_iter()
                .map(|(lane, owner, epoch, expires_at)| LaneInfo {
                    lane,
                    owner,
                    epoch,
                    expires_at,
                })
                .collect(),
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        type Row = (
            Uuid,
            String,
            Option<String>,
            Option<i64>,
            i32,
            String,
            bool,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(sql::DEAD_LETTERS)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, topic, key, seq, attempts, error, parked, dead_at)| DeadLetter {
                id,
                topic,
                key,
                seq,
                attempts,
                error,
                parked,
                dead_at,
            })
            .collect())
    }

    async fn retry_dead_letter(&self, id: Uuid) -> Result<bool> {
        let r = sqlx::query(sql::RETRY_DEAD_LETTER).bind(id).execute(&self.pool).await?;
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
            .bind(millis(older_than))
            .bind(batch as i64)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

#[async_trait]
impl Wakeups for PgStore {
    async fn set_idle(&self, lease: &Lease, idle: bool) -> Result<()> {
        sqlx::query(sql::SET_IDLE)
            .bind(lease.lane)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(idle)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<BoxStream<'static, i32>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(sql::NOTIFY_CHANNEL).await?;
        // Errors (lost connection) are skipped: PgListener reconnects on the next poll, and the
        // relay's poll fallback covers notifications missed meanwhile.
        let lanes = listener.into_stream().filter_map(|n| async move {
            match n {
                Ok(n) => n.payload().parse::<i32>().ok(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; relying on polling until it is back");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    None
                }
            }
        });
        Ok(lanes.boxed())
    }
}

fn to_leases(owner: &str, rows: Vec<(i32, i64)>) -> Vec<Lease> {
    rows.into_iter()
        .map(|(lane, epoch)| Lease {
            lane,
            epoch,
            owner: owner.to_owned(),
        })
        .collect()
}
