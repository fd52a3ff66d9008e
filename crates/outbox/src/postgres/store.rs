//! `PgStore`: what the relay does on PostgreSQL its own way (acquire, renew, claim, mark); the rest is
//! the body in [`crate::sql_store`] over this database's dialect (`sql.rs`: statements, decoding).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Postgres;

use super::combine::Combiner;
use super::sql;
use crate::message::ClaimRow;
use crate::sql_store::leases;
use crate::{Delivered, Error, Lease, Result, StoredMessage, Wakeups};

/// The PostgreSQL [`Store`](crate::Store).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    keep_published: bool,
    /// Shared with the statements' tasks, so a mark does not copy it.
    mark_sql: Arc<str>,
    failed_sql: String,
    dead_sql: String,
    /// Where claims run, each one statement with JIT off.
    claim_pool: Arc<ClaimPool>,
    /// The claims, and the marks, of lanes that ask at the same moment share a statement.
    claims: Arc<Combiner<Claim, Vec<StoredMessage>>>,
    marks: Arc<Combiner<Mark, bool>>,
}

/// How many claims, and how many marks, run at a time (each for every lane that asked meanwhile).
const AT_ONCE: usize = 2;

/// Where the claims run: one statement each, with JIT off, on connections of the store's own.
#[derive(Debug)]
struct ClaimPool {
    given: PgPool,
    /// Opened at the first claim (a pool opens inside a runtime): the given pool's settings and
    /// hooks, at most [`AT_ONCE`] connections, each started with JIT off. The given pool's own
    /// connections keep their setting.
    ///
    /// No ping before each acquire (sqlx's default would spend a round trip on it before every
    /// claim): a claim is a plain read, so one that finds its connection broken (the server
    /// restarted, a proxy dropped it) runs again on another ([`CLAIM_TRIES`]).
    own: OnceLock<PgPool>,
    /// When the server, or a pooler in front of it, last refused one of those connections (PgBouncer
    /// refuses the startup option): until [`RETRY_OWN`] later, claims turn JIT off in a
    /// transaction of their own on the given pool (BEGIN, SET LOCAL, the claim, COMMIT).
    refused_at: Mutex<Option<Instant>>,
}

/// How long claims stay on the given pool after a refused connection of the store's own.
const RETRY_OWN: Duration = Duration::from_secs(60);

/// How many times a claim runs when its connection turns out broken: once on each idle connection
/// of the store's own (all may have been cut at once), then on a new one.
const CLAIM_TRIES: usize = AT_ONCE + 1;

impl ClaimPool {
    fn new(given: PgPool) -> Self {
        ClaimPool {
            given,
            own: OnceLock::new(),
            refused_at: Mutex::new(None),
        }
    }

    /// A connection whose JIT is off, or `None` when claims must turn it off themselves.
    async fn connection(&self) -> Result<Option<PoolConnection<Postgres>>> {
        if self.refused_at().is_some_and(|t| t.elapsed() < RETRY_OWN) {
            return Ok(None);
        }
        let own = self.own.get_or_init(|| {
            let opts = self.given.connect_options().as_ref().clone().options([("jit", "off")]);
            self.given
                .options()
                .clone()
                .max_connections(AT_ONCE as u32)
                .min_connections(0)
                .test_before_acquire(false)
                .connect_lazy_with(opts)
        });
        match own.acquire().await {
            Ok(conn) => {
                *self.refused_at() = None;
                Ok(Some(conn))
            }
            Err(sqlx::Error::Database(e)) => {
                let mut refused_at = self.refused_at();
                if refused_at.is_none() {
                    tracing::warn!(error = %e, "a connection with JIT off was refused; claims turn JIT off in a transaction of their own for a minute");
                }
                *refused_at = Some(Instant::now());
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn refused_at(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.refused_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `e` says the connection itself is gone (reset, closed, or ended by the server: class
/// 57P, operator intervention, or 08, connection exception), not that the statement failed.
fn connection_broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        _ => false,
    }
}

/// One lane's claim: its lease, how many rows, and the positions it has in flight.
#[derive(Debug)]
struct Claim {
    lease: Lease,
    limit: i64,
    in_flight: Vec<i64>,
}

/// One lane's mark: its lease and the rows the broker confirmed.
#[derive(Debug)]
struct Mark {
    lease: Lease,
    done: Vec<Delivered>,
}

/// A claimed row, tagged with the ordinal of the claim it answers.
#[derive(sqlx::FromRow)]
struct Tagged {
    ord: i64,
    #[sqlx(flatten)]
    row: ClaimRow<sql::Text, sql::Time>,
}

impl PgStore {
    /// A store on `pool`. Published rows are deleted.
    ///
    /// Claims run with JIT off, each in one statement, on up to two connections of the store's
    /// own: opened at the first claim with the pool's settings and hooks and JIT off (the pool's
    /// own connections keep their setting), and not pinged before each claim.
    pub fn new(pool: PgPool) -> Self {
        PgStore {
            claim_pool: Arc::new(ClaimPool::new(pool.clone())),
            pool,
            keep_published: false,
            mark_sql: sql::mark_published_delete().into(),
            failed_sql: sql::mark_failed(),
            dead_sql: sql::dead_letter(),
            claims: Arc::new(Combiner::new(AT_ONCE)),
            marks: Arc::new(Combiner::new(AT_ONCE)),
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
        }
        .into();
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// `Ok` when the statement found the lease held, `StaleLease` otherwise.
fn held(lease: &Lease, held: bool) -> Result<()> {
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

async fn claim(store: &PgStore, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
    let claim = Claim {
        lease: lease.clone(),
        limit: limit as i64,
        in_flight: in_flight.to_vec(),
    };
    let pool = Arc::clone(&store.claim_pool);
    store
        .claims
        .call(claim, move |claims| claim_together(Arc::clone(&pool), claims))
        .await
}

/// The lease columns of a shared statement ($1-$3: lane, owner, epoch), one row per request.
fn lease_columns<'a>(leases: impl Iterator<Item = &'a Lease>) -> (Vec<i32>, Vec<&'a str>, Vec<i64>) {
    let (mut lanes, mut owners, mut epochs) = (vec![], vec![], vec![]);
    for l in leases {
        lanes.push(l.lane);
        owners.push(l.owner.as_str());
        epochs.push(l.epoch);
    }
    (lanes, owners, epochs)
}

/// The claims of several lanes in one statement, each answered with its own rows.
async fn claim_together(pool: Arc<ClaimPool>, claims: Vec<Claim>) -> Result<Vec<Vec<StoredMessage>>> {
    let (lanes, owners, epochs) = lease_columns(claims.iter().map(|c| &c.lease));
    let (mut limits, mut flight_ords, mut flight_pos) = (vec![], vec![], vec![]);
    for (ord, c) in (1i64..).zip(&claims) {
        limits.push(c.limit);
        flight_ords.extend(std::iter::repeat_n(ord, c.in_flight.len()));
        flight_pos.extend_from_slice(&c.in_flight);
    }
    // JIT must be off for the claim: on a large backlog its cost estimate passes `jit_above_cost`
    // and every claim would pay 60-140 ms of LLVM compilation (BENCHMARKS.md, figure 2).
    let query = || {
        sqlx::query_as(sql::CLAIM)
            .bind(lanes.clone())
            .bind(owners.clone())
            .bind(epochs.clone())
            .bind(limits.clone())
            .bind(flight_ords.clone())
            .bind(flight_pos.clone())
    };
    let mut tries = 1;
    let rows: Vec<Tagged> = loop {
        match pool.connection().await? {
            Some(mut conn) => match query().fetch_all(&mut *conn).await {
                Ok(rows) => break rows,
                Err(e) if tries < CLAIM_TRIES && connection_broken(&e) => {
                    tracing::debug!(error = %e, "a claim found its connection broken; it runs again on another");
                    conn.close_on_drop();
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            },
            None => {
                let mut tx = pool.given.begin().await?;
                sqlx::query(sql::CLAIM_NO_JIT).execute(&mut *tx).await?;
                let rows = query().fetch_all(&mut *tx).await?;
                tx.commit().await?;
                break rows;
            }
        }
    };
    let mut answers: Vec<Vec<StoredMessage>> = claims.iter().map(|_| Vec::new()).collect();
    for Tagged { ord, row } in rows {
        answers[(ord - 1) as usize].push(row.decode(sql::text, sql::time));
    }
    Ok(answers)
}

async fn mark_published(store: &PgStore, lease: &Lease, done: &[Delivered]) -> Result<()> {
    let mark = Mark {
        lease: lease.clone(),
        done: done.to_vec(),
    };
    let (pool, sql, keep) = (store.pool.clone(), Arc::clone(&store.mark_sql), store.keep_published);
    let held_then = store
        .marks
        .call(mark, move |marks| {
            mark_together(pool.clone(), Arc::clone(&sql), keep, marks)
        })
        .await?;
    held(lease, held_then)
}

/// The marks of several lanes in one statement; answers whether each one's lease was held.
/// `keep`: `sql` is the keeping variant, which takes partitions and offsets too.
async fn mark_together(pool: PgPool, sql: Arc<str>, keep: bool, marks: Vec<Mark>) -> Result<Vec<bool>> {
    let (lanes, owners, epochs) = lease_columns(marks.iter().map(|m| &m.lease));
    let (mut ords, mut pos, mut parts, mut offs) = (vec![], vec![], vec![], vec![]);
    for (ord, m) in (1i64..).zip(&marks) {
        for d in &m.done {
            ords.push(ord);
            pos.push(d.pos);
            parts.push(d.partition);
            offs.push(d.offset);
        }
    }
    let mut q = sqlx::query_scalar(&sql)
        .bind(lanes)
        .bind(owners)
        .bind(epochs)
        .bind(ords)
        .bind(pos);
    if keep {
        q = q.bind(parts).bind(offs);
    }
    Ok(q.fetch_all(&pool).await?)
}

async fn mark_failed(store: &PgStore, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
    settle_one(store, &store.failed_sql, lease, pos, error, sql::span(retry_in)).await
}

async fn dead_letter(store: &PgStore, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
    settle_one(store, &store.dead_sql, lease, pos, error, park).await
}

/// Runs `sql` on row `pos` of `lease`'s lane: $1-$3 the lease, $4 the row, $5 the error, $6 what
/// the statement does with it (retry delay, or whether to park). `StaleLease` when the lease was
/// not held.
async fn settle_one<'q, T>(
    store: &PgStore,
    sql: &'q str,
    lease: &'q Lease,
    pos: i64,
    error: &'q str,
    last: T,
) -> Result<()>
where
    T: 'q + Send + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    let r: (bool, i64) = sqlx::query_as(sql)
        .bind(lease.lane)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .bind(pos)
        .bind(error)
        .bind(last)
        .fetch_one(&store.pool)
        .await?;
    held(lease, r.0)
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
