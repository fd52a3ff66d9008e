//! `PgStore`: what the relay does on PostgreSQL its own way (acquire, renew, claim, mark); the rest is
//! the body in [`crate::sql_store`] over this database's dialect (`sql.rs`: statements, decoding).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Row;

use super::combine::Combiner;
use super::own::OwnConns;
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
    /// Where claims, marks and the lingering lanes' watch run, each one statement with JIT,
    /// bitmap scans and sequential scans off.
    own: Arc<OwnConns>,
    /// The claims, and the marks, of lanes that ask at the same moment share a statement.
    claims: Arc<Combiner<Claim, Vec<StoredMessage>>>,
    marks: Arc<Combiner<Mark, bool>>,
    /// This store's own statements so far, which the probe hands to the adaptive pace beside the
    /// database's counts.
    counted: Arc<Counted>,
}

/// The transactions of the store's own statements: one a statement, however many lanes share it.
#[derive(Debug, Default)]
struct Counted {
    /// Those that take a transaction id: the marks, the failures, the idle flags, the probes.
    writes: AtomicI64,
    /// Those that only read: the claims and the looks at the lingering lanes.
    reads: AtomicI64,
}

impl Counted {
    /// Counts one statement that takes a transaction id.
    fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one statement that only reads.
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `fetch_all` of the query `$query` builds (again on a retry) on the store's own connections
/// ([`OwnConns::run`]): `Ok(None)` when those are refused.
macro_rules! fetch_on_own {
    ($own:expr, $query:expr) => {
        $own.run(|mut conn| {
            let q = $query;
            async move {
                let rows = q.fetch_all(&mut conn).await;
                (conn, rows)
            }
        })
    };
}

/// How many claims, and how many marks, run at a time (each for every lane that asked meanwhile).
/// Two: a lane woken waits for its claim before it publishes, and with one at a time the lanes the
/// watch woke waited for each other's claims (BENCHMARKS.md, figure 3); a mark held up on one lane's
/// row would hold up every other lane's (tests/pg/renewal.rs).
const AT_ONCE: usize = 2;

/// How long a mark waits for the mark statement running before the second one starts for it. A
/// mark takes 0.1-0.3 ms at 5,000 msg/s: the marks that come meanwhile go together in the next
/// statement instead of one by one in the second place, which is there for a mark held up (a
/// locked row, a slow disk). At 5,000 msg/s: 0.22 mark statements a message against 0.29,
/// PostgreSQL 0.56-0.60 cores against 0.65-0.67 (BENCHMARKS.md, figure 3). A lane woken waits for
/// its claim before it publishes, so claims get no patience.
const MARK_PATIENCE: Duration = Duration::from_millis(5);
/// How long a small mark that finds no mark statement running waits for others before its
/// statement starts ([`MARK_GATHER_BELOW`] rows): at 5,000 msg/s a batch holds one or two rows,
/// and the lanes' confirmations come spread out, so each mark ran nearly alone. The lane waits for
/// its mark before its next claim; the look at the lingering lanes comes every 5 ms anyway.
const MARK_GATHER: Duration = Duration::from_millis(1);
/// Marks of this many rows or more start their statement at once: they carry enough rows for the
/// statement's own cost, and a lane draining a backlog would wait for every one of them.
const MARK_GATHER_BELOW: usize = 64;

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
    /// Claims and marks run each in one statement on connections of the store's own (up to two
    /// for each): opened at the first one with the pool's settings and hooks and JIT, bitmap scans
    /// and sequential scans off (the pool's own connections keep theirs), and held outside the
    /// pool, so no ping goes with a statement.
    pub fn new(pool: PgPool) -> Self {
        PgStore {
            own: Arc::new(OwnConns::new(pool.clone())),
            pool,
            keep_published: false,
            mark_sql: sql::mark_published_delete().into(),
            failed_sql: sql::mark_failed(),
            dead_sql: sql::dead_letter(),
            claims: Arc::new(Combiner::new(AT_ONCE)),
            marks: Arc::new(Combiner::new(AT_ONCE).patience(MARK_PATIENCE)),
            counted: Arc::default(),
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

    /// The statement that marks rows published (its plan is checked by the tests): $1-$3 a lease
    /// per request (lane, owner, epoch); per delivered row, $4 its request's ordinal, $5 its lane,
    /// $6 its position (when keeping: $7 its partition, $8 its offset).
    #[doc(hidden)]
    pub fn mark_published_sql(&self) -> &str {
        &self.mark_sql
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The probe's own write counted, the store's counts so far ([`crate::ProbeCounts::own_writes`],
/// [`crate::ProbeCounts::own_finished`]).
fn count_probe(store: &PgStore) -> (Option<i64>, Option<i64>) {
    let c = &store.counted;
    c.write();
    let writes = c.writes.load(Ordering::Relaxed);
    (Some(writes), Some(writes + c.reads.load(Ordering::Relaxed)))
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
    let (own, counted) = (Arc::clone(&store.own), Arc::clone(&store.counted));
    store
        .claims
        .call(claim, move |claims| {
            counted.read();
            claim_together(Arc::clone(&own), claims)
        })
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
async fn claim_together(own: Arc<OwnConns>, claims: Vec<Claim>) -> Result<Vec<Vec<StoredMessage>>> {
    let (lanes, owners, epochs) = lease_columns(claims.iter().map(|c| &c.lease));
    let (mut limits, mut flight_ords, mut flight_pos) = (vec![], vec![], vec![]);
    for (ord, c) in (1i64..).zip(&claims) {
        limits.push(c.limit);
        flight_ords.extend(std::iter::repeat_n(ord, c.in_flight.len()));
        flight_pos.extend_from_slice(&c.in_flight);
    }
    // JIT, bitmap scans and sequential scans must be off for the claim (own.rs, `PLANNER_SETTINGS`).
    let query = || {
        sqlx::query_as(sql::CLAIM)
            .bind(lanes.clone())
            .bind(owners.clone())
            .bind(epochs.clone())
            .bind(limits.clone())
            .bind(flight_ords.clone())
            .bind(flight_pos.clone())
    };
    let rows: Vec<Tagged> = match fetch_on_own!(own, query()).await? {
        Some(rows) => rows,
        None => {
            // The store's own connections were refused: the settings for this transaction only.
            let mut tx = own.given().begin().await?;
            sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(&sql::LOCAL_SETTINGS)).await?;
            let rows = query().fetch_all(&mut *tx).await?;
            tx.commit().await?;
            rows
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
    let (own, sql, keep, counted) = (
        Arc::clone(&store.own),
        Arc::clone(&store.mark_sql),
        store.keep_published,
        Arc::clone(&store.counted),
    );
    let gather = if done.len() < MARK_GATHER_BELOW {
        MARK_GATHER
    } else {
        Duration::ZERO
    };
    let held_then = store
        .marks
        .call_gathering(mark, gather, move |marks| {
            // One statement, one transaction id, for every lane that shares it.
            counted.write();
            mark_together(Arc::clone(&own), Arc::clone(&sql), keep, marks)
        })
        .await?;
    held(lease, held_then)
}

/// The marks of several lanes in one statement; answers whether each one's lease was held.
/// `keep`: `sql` is the keeping variant, which takes partitions and offsets too. A second run of
/// the statement changes nothing (its rows are gone) and gives the same answer, so it may run on
/// the store's own connections.
async fn mark_together(own: Arc<OwnConns>, sql: Arc<str>, keep: bool, marks: Vec<Mark>) -> Result<Vec<bool>> {
    let (lanes, owners, epochs) = lease_columns(marks.iter().map(|m| &m.lease));
    let (mut ords, mut row_lanes, mut pos, mut parts, mut offs) = (vec![], vec![], vec![], vec![], vec![]);
    for (ord, m) in (1i64..).zip(&marks) {
        for d in &m.done {
            ords.push(ord);
            row_lanes.push(m.lease.lane);
            pos.push(d.pos);
            parts.push(d.partition);
            offs.push(d.offset);
        }
    }
    let query = || {
        let q = sqlx::query_scalar(&sql)
            .bind(lanes.clone())
            .bind(owners.clone())
            .bind(epochs.clone())
            .bind(ords.clone())
            .bind(row_lanes.clone())
            .bind(pos.clone());
        match keep {
            true => q.bind(parts.clone()).bind(offs.clone()),
            false => q,
        }
    };
    match fetch_on_own!(own, query()).await? {
        Some(held) => Ok(held),
        None => Ok(query().fetch_all(own.given()).await?),
    }
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
    store.counted.write();
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
        self.counted.write();
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
        self.counted.read();
        let (l, after): (Vec<i32>, Vec<i64>) = lanes.iter().copied().unzip();
        let query = || {
            sqlx::query_scalar(&sql::READY_LANES)
                .bind(l.clone())
                .bind(after.clone())
        };
        if let Some(ready) = fetch_on_own!(self.own, query()).await? {
            return Ok(ready);
        }
        // The store's own connections were refused: the look under their settings all the same,
        // still one round trip.
        let rows = sqlx::raw_sql(&sql::ready_lanes_with_settings(lanes))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?)
    }

    async fn open_transactions(&self) -> Result<Vec<i64>> {
        // It takes a transaction id, for the upper end of the list.
        self.counted.write();
        Ok(sqlx::query_scalar(sql::OPEN_TRANSACTIONS).fetch_one(&self.pool).await?)
    }

    async fn still_open(&self, ids: &[i64]) -> Result<Vec<i64>> {
        self.counted.read();
        Ok(sqlx::query_scalar(sql::STILL_OPEN)
            .bind(ids)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn listen(&self) -> Result<BoxStream<'static, i32>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(sql::NOTIFY_CHANNEL).await?;
        // LISTEN starts beside the relay's lanes, on a connection of its own: a lane may have said
        // idle before it was in place, and a commit meanwhile notified nobody.
        Ok(futures::stream::unfold((listener, every_lane()), next_woken).boxed())
    }
}

fn every_lane() -> Vec<i32> {
    (0..crate::LANES).collect()
}

/// The next lane woken: those in `all` first, then by NOTIFY, and every lane again once LISTEN is
/// back after its connection was lost (commits meanwhile notified nobody). `PgListener` connects
/// again at once when it finds its connection lost; when that fails, LISTEN makes it again every
/// second until it works.
async fn next_woken((mut listener, mut all): (PgListener, Vec<i32>)) -> Option<(i32, (PgListener, Vec<i32>))> {
    loop {
        if let Some(lane) = all.pop() {
            return Some((lane, (listener, all)));
        }
        match listener.try_recv().await {
            Ok(Some(n)) => match n.payload().parse::<i32>() {
                Ok(lane) => return Some((lane, (listener, all))),
                Err(_) => continue,
            },
            // Lost, and made again (LISTEN with it): every lane looks once more.
            Ok(None) => {
                tracing::warn!("LISTEN connection lost and made again; every lane looks once more");
                all = every_lane();
            }
            // The pool closed: the relay is stopping.
            Err(sqlx::Error::PoolClosed) => return None,
            // Made again here, not by `try_recv` (which would say nothing when it works).
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match listener.listen(sql::NOTIFY_CHANNEL).await {
                        Ok(()) => break,
                        Err(sqlx::Error::PoolClosed) => return None,
                        Err(_) => {}
                    }
                }
                tracing::info!("LISTEN connection back; every lane looks once more");
                all = every_lane();
            }
        }
    }
}
