//! The store's own connections, where the relay's hottest statements run (claims, marks, the
//! lingering lanes' watch): each one statement, with JIT, bitmap scans and sequential scans off
//! ([`PLANNER_SETTINGS`]), and no round trip besides it.

use std::future::Future;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Postgres;

use crate::Result;

/// Connections opened with the given pool's settings and hooks and [`PLANNER_SETTINGS`], the given
/// pool's own connections keeping theirs. They are held outside any pool: sqlx pings a pooled
/// connection before each acquire (by default) and after each release, two round trips for each
/// statement. A statement run here must be safe to run twice (a read, or a write whose second run
/// changes nothing), because one whose connection broke runs again on a new one.
#[derive(Debug)]
pub(super) struct OwnConns {
    given: PgPool,
    /// Opens the connections, at the first statement (a pool opens inside a runtime); each one is
    /// detached from it at once and kept in `idle` between statements.
    opener: OnceLock<PgPool>,
    idle: Mutex<Vec<PgConnection>>,
    /// When the server, or a pooler in front of it, last refused a connection (PgBouncer refuses
    /// the startup option that turns JIT off): until [`RETRY_OWN`] later, the statements run on
    /// the given pool, their own way.
    refused_at: Mutex<Option<Instant>>,
}

/// The planner settings of the store's own connections (and, when those are refused, of a claim's
/// transaction and of the look's: `LOCAL_SETTINGS` in `sql.rs`).
///
/// - `jit`: on a large backlog the claim's cost estimate passes `jit_above_cost`, and every claim
///   would pay 60-140 ms of LLVM compilation (BENCHMARKS.md, figure 2).
/// - `enable_bitmapscan`: between two autovacuums of the busy outbox table its statistics say it
///   holds a few rows; the planner then took a lane's rows for the claim (and the lingering lanes'
///   look) with a bitmap scan, which visits every dead row of the lane on each claim, where an
///   index scan in position order stops at the limit and marks the dead index entries it passes
///   as dead for the scans after it. auto_explain beside the latency benchmark logged claims of
///   150-260 ms, all bitmap scans, with p50 latencies of 35-290 ms at 5,000 msg/s.
/// - `enable_seqscan`: on an empty outbox table (a relay that starts before its writers, a vacuum
///   that just truncated it) the claim and the look are planned as sequential scans, the claim's
///   check for a key's waiting row too, once per row. The plan is cached with the statement and
///   kept until the next autovacuum or analyze of the table, while the table grows to thousands
///   of pages of live and dead rows: claims of over a second, rounds of 5-25 s at 5,000 msg/s.
///   Every table these statements read in bulk has the index they need (`outbox_source`, one
///   row, is still read whole).
pub(super) const PLANNER_SETTINGS: [(&str, &str); 3] =
    [("jit", "off"), ("enable_bitmapscan", "off"), ("enable_seqscan", "off")];

/// How long statements stay on the given pool after a refused connection of the store's own.
const RETRY_OWN: Duration = Duration::from_secs(60);

impl OwnConns {
    pub(super) fn new(given: PgPool) -> Self {
        OwnConns {
            given,
            opener: OnceLock::new(),
            idle: Mutex::new(Vec::new()),
            refused_at: Mutex::new(None),
        }
    }

    /// The pool the store was given.
    pub(super) fn given(&self) -> &PgPool {
        &self.given
    }

    /// Runs `statement` on a connection of the store's own; `Ok(None)` when those are refused, and
    /// the caller runs it on [`Self::given`] instead. `statement` hands the connection back with
    /// its answer.
    ///
    /// A connection that turns out broken (the server restarted, a network device dropped it) is
    /// dropped with every idle one, which the same cause broke too in all likelihood, and the
    /// statement runs once more on a new connection.
    pub(super) async fn run<T, F, Fut>(&self, statement: F) -> Result<Option<T>>
    where
        F: Fn(PgConnection) -> Fut,
        Fut: Future<Output = (PgConnection, sqlx::Result<T>)>,
    {
        let mut broken_before = false;
        loop {
            let Some(conn) = self.take().await? else {
                return Ok(None);
            };
            match statement(conn).await {
                (conn, Ok(answer)) => {
                    self.idle().push(conn);
                    return Ok(Some(answer));
                }
                (_, Err(e)) if connection_broken(&e) && !broken_before => {
                    tracing::info!(error = %e, "a connection of the store's own broke; the statement runs again on a new one");
                    self.idle().clear();
                    broken_before = true;
                }
                (conn, Err(e)) => {
                    if !connection_broken(&e) {
                        self.idle().push(conn);
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// An idle connection, or a new one; `None` when new ones are refused.
    async fn take(&self) -> Result<Option<PgConnection>> {
        if let Some(conn) = self.idle().pop() {
            return Ok(Some(conn));
        }
        if self.refused_at().is_some_and(|t| t.elapsed() < RETRY_OWN) {
            return Ok(None);
        }
        let opener = self.opener.get_or_init(|| {
            let opts = self.given.connect_options().as_ref().clone().options(PLANNER_SETTINGS);
            let given: &PoolOptions<Postgres> = self.given.options();
            given.clone().min_connections(0).connect_lazy_with(opts)
        });
        match opener.acquire().await {
            Ok(conn) => {
                *self.refused_at() = None;
                Ok(Some(conn.detach()))
            }
            Err(sqlx::Error::Database(e)) => {
                let mut refused_at = self.refused_at();
                if refused_at.is_none() {
                    tracing::warn!(error = %e, settings = ?PLANNER_SETTINGS, "a connection with these startup options was refused; claims and marks run on the given pool for a minute");
                }
                *refused_at = Some(Instant::now());
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<PgConnection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refused_at(&self) -> MutexGuard<'_, Option<Instant>> {
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
