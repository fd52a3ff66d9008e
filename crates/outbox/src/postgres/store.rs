//! `PgStore`: what the relay does on PostgreSQL its own way (acquire, renew, claim, mark); the rest is
//! the body in [`crate::sql_store`] over this database's dialect (`sql.rs`: statements, decoding).

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgListener, PgPool};

use super::sql;
use crate::message::ClaimRow;
use crate::sql_store::leases;
use crate::{Delivered, Error, Lease, Result, StoredMessage, Wakeups};

/// The PostgreSQL [`Store`](crate::Store).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    keep_published: bool,
    claim_sql: String,
    mark_sql: String,
    failed_sql: String,
    dead_sql: String,
    /// The pool's connections start with JIT off: a claim is one statement, not four.
    jit_off_in_pool: bool,
}

impl PgStore {
    /// A store on `pool`. Published rows are deleted.
    ///
    /// Give the relay's pool `PgConnectOptions::options([("jit", "off")])` (the `outbox-relay`
    /// daemon does): each claim is then one statement. Otherwise a claim turns JIT off for itself
    /// in a transaction of its own (BEGIN, SET LOCAL, the claim, COMMIT).
    pub fn new(pool: PgPool) -> Self {
        PgStore {
            jit_off_in_pool: jit_off(pool.connect_options().get_options()),
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

crate::sql_store::store!(PgStore, sqlx::Postgres, sql);
crate::sql_store::acquire_in_one_statement!(PgStore, sql, leases);

async fn renew(store: &PgStore, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(sql::RENEW)
        .bind(owner)
        .bind(sql::span(ttl))
        .fetch_all(&store.pool)
        .await?;
    Ok(leases(owner, rows))
}

/// Whether PostgreSQL startup options (`-c name=value` or `--name=value`, as
/// `PgConnectOptions::options` writes them) turn JIT off.
fn jit_off(options: Option<&str>) -> bool {
    let mut words = options.unwrap_or_default().split_whitespace();
    let mut off = false;
    while let Some(w) = words.next() {
        let setting = match w {
            "-c" => words.next().unwrap_or_default(),
            w => w
                .strip_prefix("--")
                .or_else(|| w.strip_prefix("-c"))
                .unwrap_or_default(),
        };
        if let Some(("jit", v)) = setting.split_once('=') {
            off = matches!(v.to_ascii_lowercase().as_str(), "off" | "false" | "0" | "no");
        }
    }
    off
}

async fn claim(store: &PgStore, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
    // JIT must be off for the claim: on a large backlog its cost estimate passes `jit_above_cost`
    // and every claim would pay 60-140 ms of LLVM compilation (BENCHMARKS.md, figure 2).
    let query = sqlx::query_as(&store.claim_sql)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(limit as i64)
        .bind(in_flight);
    let rows: Vec<ClaimRow<sql::Text, sql::Time>> = if store.jit_off_in_pool {
        query.fetch_all(&store.pool).await?
    } else {
        let mut tx = store.pool.begin().await?;
        sqlx::query(sql::CLAIM_NO_JIT).execute(&mut *tx).await?;
        let rows = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows
    };
    Ok(rows.into_iter().map(|r| r.decode(sql::text, sql::time)).collect())
}

async fn mark_published(store: &PgStore, lease: &Lease, done: &[Delivered]) -> Result<()> {
    let pos: Vec<i64> = done.iter().map(|d| d.pos).collect();
    let mut q = sqlx::query_as(&store.mark_sql)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(&pos);
    if store.keep_published {
        let parts: Vec<i32> = done.iter().map(|d| d.partition).collect();
        let offs: Vec<i64> = done.iter().map(|d| d.offset).collect();
        q = q.bind(parts).bind(offs);
    }
    held(lease, q.fetch_one(&store.pool).await?)
}

async fn mark_failed(store: &PgStore, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
    let r = sqlx::query_as(&store.failed_sql)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(pos)
        .bind(error)
        .bind(sql::span(retry_in))
        .fetch_one(&store.pool)
        .await?;
    held(lease, r)
}

async fn dead_letter(store: &PgStore, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
    let r = sqlx::query_as(&store.dead_sql)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(pos)
        .bind(error)
        .bind(park)
        .fetch_one(&store.pool)
        .await?;
    held(lease, r)
}

fn wakeups(store: &PgStore) -> Option<&dyn Wakeups> {
    Some(store)
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

    async fn ready_lanes(&self, lanes: &[(i32, i64)]) -> Result<Vec<i32>> {
        let (lanes, after): (Vec<i32>, Vec<i64>) = lanes.iter().copied().unzip();
        Ok(sqlx::query_scalar(sql::READY_LANES)
            .bind(lanes)
            .bind(after)
            .fetch_all(&self.pool)
            .await?)
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

#[cfg(test)]
mod tests {
    use super::jit_off;

    #[test]
    fn jit_off_is_read_from_the_startup_options() {
        let opts = sqlx::postgres::PgConnectOptions::new().options([("statement_timeout", "30s"), ("jit", "off")]);
        assert!(jit_off(opts.get_options()));
        assert!(jit_off(Some("--jit=false")));
        assert!(jit_off(Some("-cjit=off")));
        assert!(!jit_off(None));
        assert!(!jit_off(Some("-c jit=on")));
        assert!(!jit_off(Some("-c jit=off -c jit=on")), "the last one wins");
        assert!(!jit_off(Some("-c jit_above_cost=off")));
        let url: sqlx::postgres::PgConnectOptions = "postgres://u@h/db?options=-c%20jit%3Doff".parse().unwrap();
        assert!(jit_off(url.get_options()), "{:?}", url.get_options());
    }
}
