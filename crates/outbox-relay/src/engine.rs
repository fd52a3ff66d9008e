//! The relay engine: keeps a fair share of lanes leased (renewing, taking over expired ones, giving
//! extras back when other relays join), runs one lane loop per held lane, and drains on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use outbox::{Lease, LocalWakeup, Publisher, Store, LANES};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::lane::{run_lane, LaneExit};
use crate::metrics as m;
use crate::shared::Shared;

/// Errors that stop the relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid.
    #[error("invalid relay configuration: {0}")]
    Config(String),
}

/// The relay: generic over the database ([`Store`]) and the broker ([`Publisher`]).
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool, publisher: outbox_kafka::KafkaPublisher) -> anyhow::Result<()> {
/// use outbox_relay::{Relay, RelayConfig};
/// let store = outbox::postgres::PgStore::new(pool);
/// Relay::new(store, publisher)
///     .config(RelayConfig::default().batch_size(1000))
///     .run_until(async { tokio::signal::ctrl_c().await.ok(); })
///     .await?;
/// # Ok(()) }
/// ```
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    cfg: RelayConfig,
    local: Option<LocalWakeup>,
    health: crate::RelayHealth,
}

struct Running {
    lease: Lease,
    stop: CancellationToken,
    task: JoinHandle<LaneExit>,
}

impl<S: Store, P: Publisher> Relay<S, P> {
    /// A relay with default settings.
    pub fn new(store: S, publisher: P) -> Self {
        Relay {
            store,
            publisher,
            cfg: RelayConfig::default(),
            local: None,
            health: crate::RelayHealth::default(),
        }
    }

    /// Replaces the settings.
    pub fn config(mut self, cfg: RelayConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Also wakes on commits in this process (from [`outbox::Outbox::local_wakeup`]): a lane
    /// claims as soon as [`outbox::Outbox::commit`] returns for a transaction that wrote to it,
    /// without waiting for NOTIFY, the linger watch or the poll.
    pub fn wake_on(mut self, local: LocalWakeup) -> Self {
        self.local = Some(local);
        self
    }

    /// A view of this relay's state while it runs (lanes held, published count, broker
    /// outage), for readiness probes and consoles.
    pub fn health(&self) -> crate::RelayHealth {
        self.health.clone()
    }

    /// Runs until `shutdown` completes, then stops claiming, lets in-flight batches finish (up to
    /// `shutdown_grace`), releases its leases and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RelayError> {
        self.cfg.validate().map_err(RelayError::Config)?;
        let backoff = self
            .cfg
            .retry_backoff()
            .map_err(|e| RelayError::Config(e.to_string()))?;
        let shared = Arc::new(Shared {
            store: self.store,
            publisher: self.publisher,
            wake: (0..LANES).map(|_| tokio::sync::Notify::new()).collect(),
            local: self.local,
            busy: self.cfg.max_busy_lanes.map(tokio::sync::Semaphore::new),
            adaptive: self.cfg.adaptive_pace.then(Default::default),
            rate: self
                .cfg
                .max_rate
                .and_then(std::num::NonZeroU32::new)
                .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r))),
            backoff,
            meters: m::Meters::new(self.cfg.name.as_deref()),
            health: self.health,
            watched: Default::default(),
            cfg: self.cfg,
        });
        let owner = shared.cfg.owner.clone();
        tracing::info!(%owner, database = shared.cfg.name.as_deref(), "relay starting");
        let wakers = spawn_wakers(shared.clone());
        let stats = tokio::spawn(stats_loop(shared.clone()));
        let cleanup = tokio::spawn(cleanup_loop(shared.clone()));
        let watch = tokio::spawn(crate::linger::watch(shared.clone()));
        let pace = tokio::spawn(crate::pace::control(shared.clone()));

        let mut running: HashMap<i32, Running> = HashMap::new();
        let tick = (shared.cfg.lease_ttl / 3).max(Duration::from_millis(200));
        let mut last_renewed = Instant::now();
        tokio::pin!(shutdown);
        loop {
            // Reap lanes that ended by themselves (lost lease).
            running.retain(|lane, r| {
                if r.task.is_finished() {
                    tracing::info!(lane, "lane stopped");
                    false
                } else {
                    true
                }
            });
            // Rounds begin a tick apart, however long the last one took: each renews first.
            let round = tokio::time::Instant::now();
            // A renewal that never answers (a cut connection) must not hold the shutdown: the
            // signal ends the wait. Leases it took meanwhile expire after `lease_ttl`. Nor the
            // relay: a round without an answer within the lease counts as failed, and the lanes
            // stop once their leases have lapsed.
            let round_done = tokio::time::timeout(
                shared.cfg.lease_ttl,
                maintain(&shared, &owner, &mut running, &mut last_renewed, tick),
            );
            let failed = tokio::select! {
                r = round_done => match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer within the lease ({:?})", shared.cfg.lease_ttl)),
                },
                _ = &mut shutdown => break,
            };
            if let Some(e) = failed {
                shared.meters.store_errors.increment(1);
                tracing::warn!(error = %e, "lease maintenance failed");
                if last_renewed.elapsed() > shared.cfg.lease_ttl {
                    // Our leases have expired by now: others may own the lanes.
                    for (_, r) in running.drain() {
                        r.stop.cancel();
                    }
                }
            }
            shared.meters.lanes_held.set(running.len() as f64);
            shared.health.set_lanes_held(running.len());
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(round + tick) => {}
            }
        }

        tracing::info!(lanes = running.len(), "shutting down: draining in-flight batches");
        for r in running.values() {
            r.stop.cancel();
        }
        let deadline = tokio::time::Instant::now() + shared.cfg.shutdown_grace;
        let mut stopped = Vec::new();
        for (lane, r) in running {
            let abort = r.task.abort_handle();
            match tokio::time::timeout_at(deadline, r.task).await {
                Ok(Ok(LaneExit::Stopped)) => stopped.push(r.lease),
                Ok(_) => {}
                Err(_) => {
                    abort.abort();
                    tracing::warn!(lane, "in-flight batch did not finish within the grace period");
                }
            }
        }
        // Leases back and deregistration, all at once and within the grace period (at least a few
        // seconds): when the database does not answer, they expire by themselves, rather than
        // SIGTERM waiting one connect timeout per lane.
        let store = &shared.store;
        let give_back = async {
            futures::future::join_all(stopped.iter().map(|lease| async move {
                if let Err(e) = store.release(lease).await {
                    tracing::warn!(lane = lease.lane, error = %e, "could not release lease; it will expire");
                }
            }))
            .await;
            if let Err(e) = store.leave(&owner).await {
                tracing::warn!(error = %e, "could not deregister; other relays rebalance when the heartbeat expires");
            }
        };
        let until = deadline.max(tokio::time::Instant::now() + Duration::from_secs(5));
        if tokio::time::timeout_at(until, give_back).await.is_err() {
            tracing::warn!("database did not answer in time: leases and heartbeat will expire by themselves");
        }
        wakers.abort();
        stats.abort();
        cleanup.abort();
        watch.abort();
        pace.abort();
        shared.meters.lanes_held.set(0.0);
        shared.health.set_lanes_held(0);
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// One round of lease upkeep: renew what we hold (`renewed`: when the last renewal that succeeded
/// was sent), stop lanes we lost, take or give back lanes to reach a fair share. While the rest
/// of the round takes longer than a `tick` (the live relays, acquisitions: a busy pool, a lock
/// wait), the leases and the heartbeat are renewed again meanwhile: renewed only once a round,
/// they all expired before the next one, and other relays took the lanes.
async fn maintain<S: Store, P: Publisher>(
    shared: &Arc<Shared<S, P>>,
    owner: &str,
    running: &mut HashMap<i32, Running>,
    renewed: &mut Instant,
    tick: Duration,
) -> outbox::Result<()> {
    let ttl = shared.cfg.lease_ttl;
    let sent = Instant::now();
    let held = shared.store.renew(owner, ttl).await?;
    *renewed = sent;
    let work = rebalance(shared, owner, running, held);
    tokio::pin!(work);
    let mut due = sent + tick;
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tokio::time::sleep_until(due.into()) => {
                // Lanes lost meanwhile are found by the next round's renewal.
                let sent = Instant::now();
                match shared.store.renew(owner, ttl).await {
                    Ok(_) => *renewed = sent,
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
                due = sent + tick;
            }
        }
    }
}

/// Stops the lanes whose lease was not renewed (`held` is what was), gives back leases without a
/// loop, and takes or gives back lanes to reach a fair share.
async fn rebalance<S: Store, P: Publisher>(
    shared: &Arc<Shared<S, P>>,
    owner: &str,
    running: &mut HashMap<i32, Running>,
    held: Vec<Lease>,
) -> outbox::Result<()> {
    let ttl = shared.cfg.lease_ttl;
    running.retain(|lane, r| {
        let still = held.iter().any(|l| l.lane == *lane && l.epoch == r.lease.epoch);
        if !still {
            tracing::warn!(lane, "lease lost; stopping lane");
            r.stop.cancel();
        }
        still
    });
    // Leases we hold but run no loop for (a lane that just finished): give them back.
    for l in held.iter().filter(|l| !running.contains_key(&l.lane)) {
        shared.store.release(l).await?;
    }
    // Includes this relay: `renew` above was its heartbeat.
    let owners = shared.store.live_owners().await?.max(1);
    let fair = (LANES as usize).div_ceil(owners);
    let want = shared.cfg.max_lanes.map_or(fair, |m| m.min(fair)).max(1);
    if running.len() < want {
        for lease in shared.store.acquire(owner, want - running.len(), ttl).await? {
            tracing::info!(lane = lease.lane, epoch = lease.epoch, "lane acquired");
            let stop = CancellationToken::new();
            let task = tokio::spawn(run_lane(shared.clone(), lease.clone(), stop.clone()));
            running.insert(lease.lane, Running { lease, stop, task });
        }
    } else if running.len() > want {
        // Give extras back after their current batch; the next round releases them.
        let mut lanes: Vec<i32> = running.keys().copied().collect();
        lanes.sort_unstable();
        for lane in lanes.into_iter().skip(want) {
            if let Some(r) = running.get(&lane) {
                r.stop.cancel();
            }
        }
        let finished: Vec<i32> = running
            .iter()
            .filter(|(_, r)| r.stop.is_cancelled() && r.task.is_finished())
            .map(|(l, _)| *l)
            .collect();
        for lane in finished {
            if let Some(r) = running.remove(&lane) {
                shared.store.release(&r.lease).await?;
                tracing::info!(lane, "lane handed back for rebalancing");
            }
        }
    }
    Ok(())
}

fn spawn_wakers<S: Store, P: Publisher>(shared: Arc<Shared<S, P>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(wakeups) = shared.store.wakeups() else {
            tracing::info!("database has no commit notifications; polling");
            return;
        };
        match wakeups.listen().await {
            Ok(mut lanes) => {
                while let Some(lane) = lanes.next().await {
                    shared.wake_lane(lane);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not LISTEN; polling"),
        }
    })
}

/// Deletes kept published rows past their retention, on a schedule (a no-op for stores that
/// delete rows when they mark them).
async fn cleanup_loop<S: Store, P: Publisher>(shared: Arc<Shared<S, P>>) {
    loop {
        tokio::time::sleep(shared.cfg.cleanup_interval).await;
        match shared
            .store
            .cleanup_published(shared.cfg.published_retention, 1000)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "deleted published rows past their retention"),
            Err(e) => tracing::warn!(error = %e, "published-rows cleanup failed; will try again"),
        }
    }
}

async fn stats_loop<S: Store, P: Publisher>(shared: Arc<Shared<S, P>>) {
    let mut unowned_since: Option<Instant> = None;
    let mut warned: Option<Instant> = None;
    loop {
        match shared.store.status().await {
            Ok(s) => {
                shared.meters.pending.set(s.pending as f64);
                shared
                    .meters
                    .oldest_pending_age
                    .set(s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
                shared.meters.dead_letters.set(s.dead_letters as f64);
                let unowned = s.unowned_lanes();
                shared.meters.lanes_unowned.set(unowned as f64);
                if unowned == 0 {
                    unowned_since = None;
                } else {
                    // A lane changes hands within a lease; one unowned for longer is served by nobody.
                    let since = *unowned_since.get_or_insert_with(Instant::now);
                    let due = warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(60));
                    if since.elapsed() >= shared.cfg.lease_ttl && due {
                        tracing::warn!(
                            unowned,
                            "lanes held by no relay: their messages wait (do the relays' max_lanes add up to fewer than 32?)"
                        );
                        warned = Some(Instant::now());
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "status refresh failed"),
        }
        tokio::time::sleep(shared.cfg.stats_interval).await;
    }
}
