//! The database misbehaving under the relay: connections killed mid-drain, the outbox table locked
//! for longer than the lock timeout, an unreachable database, and an outage longer than the lease.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox::{StoreAdmin, LANES};
use outbox_tests::daemon::{pending, wait_pending_below, RelayArgs, RelayProcess};
use outbox_tests::proxy::DbProxy;
use outbox_tests::wait::until;
use rand::Rng;

use super::{setup, Setup, BATCH, BIN, TTL_MS};

/// A pool on the same database whose connections the connection killer spares.
async fn observer(pool: &sqlx::PgPool) -> sqlx::PgPool {
    let opts = (*pool.connect_options())
        .clone()
        .application_name("outbox-test-observer");
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .unwrap()
}

/// A proxy in front of the test's database, and the URL that reaches the database through it.
async fn behind_proxy(s: &Setup) -> (DbProxy, String) {
    let proxy = DbProxy::start().await;
    let db = s.pool.connect_options().get_database().unwrap().to_owned();
    let url = format!("postgres://postgres@127.0.0.1:{}/{db}", proxy.port);
    (proxy, url)
}

/// The backlog per lane with its lease (what a drain that does not finish waits on).
async fn backlog_by_lane(pool: &sqlx::PgPool) -> String {
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT format('lane %s: %s rows, attempts %s, available in %s, error %s; epoch %s, idle %s, lease left %s', \
                m.lane, count(*), max(m.attempts), max(m.available_at) - now(), max(m.last_error), \
                l.epoch, l.idle, CASE WHEN isfinite(l.expires_at) THEN (l.expires_at - now())::text \
                ELSE l.expires_at::text END) \
         FROM outbox_messages m JOIN outbox_leases l ON l.lane = m.lane \
         GROUP BY m.lane, l.epoch, l.idle, l.expires_at ORDER BY m.lane",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    lines.join("\n")
}

/// Waits until the test's outbox is empty, failing after `within` with the backlog per lane and
/// the relay's last lines.
async fn drained(s: &Setup, relay: &RelayProcess, within: Duration) {
    let start = Instant::now();
    while pending(&s.store).await > 0 {
        if start.elapsed() > within {
            panic!(
                "not drained within {within:?}:\n{}\nrelay:\n{}",
                backlog_by_lane(&s.pool).await,
                relay.tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits `how_long`, failing the test if the relay exits meanwhile (`when` says in what state).
async fn stays_up(relay: &mut RelayProcess, how_long: Duration, when: &str) {
    let start = Instant::now();
    while start.elapsed() < how_long {
        assert!(relay.running(), "the relay died {when}:\n{}", relay.tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_while_draining_lose_nothing() {
    let s = setup("pgkill", 4, 1).await;
    let mut ids = s.enqueue(10_000, 100).await;
    let obs = observer(&s.pool).await;
    let store = outbox::postgres::PgStore::new(obs.clone());
    let db = s.pool.connect_options().get_database().unwrap().to_owned();
    let mut relay = s.relay(BATCH).spawn();
    let mut rng = rand::thread_rng();
    let (mut killed, mut rounds, mut refills) = (0i64, 0, 0);
    let mut rounds_of_this_backlog = 0;
    // A claim or a mark whose connection was killed runs again on a new one (counted with the
    // failures: the kill hit the relay).
    let failures = |relay: &outbox_tests::daemon::RelayProcess| {
        (
            relay.count("claim failed") + relay.count("the statement runs again on a new one"),
            relay.count("store write failed"),
            relay.count("lease maintenance failed"),
        )
    };
    // Every connection of the relay (claims, marks, lease upkeep, LISTEN), every 100-300 ms, for
    // 40 rounds or until the backlog is gone; then it must drain on its own. A kill between two
    // statements only costs the pool an idle connection, and the relay's statements are short: a
    // backlog drained before any kill landed on one in flight gets 10,000 rows more (3 times at most).
    loop {
        while rounds_of_this_backlog < 40 && pending(&store).await > 0 {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> 'outbox-test-observer') t",
            )
            .bind(&db)
            .fetch_one(&obs)
            .await
            .unwrap();
            killed += n;
            rounds += 1;
            rounds_of_this_backlog += 1;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(100..300))).await;
        }
        let (claims, writes, upkeep) = failures(&relay);
        if claims + writes + upkeep > 0 || refills == 3 {
            break;
        }
        refills += 1;
        rounds_of_this_backlog = 0;
        ids.extend(s.enqueue(10_000, 100).await);
    }
    wait_pending_below(&store, 1, Duration::from_secs(90)).await;
    relay.terminate();
    assert!(store.dead_letters(5).await.unwrap().is_empty());
    let (claims, writes, upkeep) = failures(&relay);
    assert!(
        killed > 0 && claims + writes + upkeep > 0,
        "the kills never hit the relay ({killed} killed)"
    );
    let dups = s.check(&ids).await;
    // Only a lost lease (lease upkeep failing for longer than the TTL) re-sends a batch per lane.
    let bound = BATCH * LANES as usize * (1 + upkeep);
    assert!(
        dups <= bound,
        "{dups} duplicates exceed one batch per lane per failed lease round ({bound})"
    );
    eprintln!(
        "killed connections: {killed} backends in {rounds} rounds, {refills} backlogs refilled; relay saw {claims} \
         failed claims or statements run again, {writes} failed marks, {upkeep} failed lease rounds; {dups} duplicates"
    );
}

/// With a service busy beside it (the pace at its floor), so a lane whose round waited on the
/// lock rests in proportion (19 times up to a second of that round): the rest must end once the
/// backlog behind it has waited `pace_max_lag` (5 s here), not at the lane's next claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_table_locked_longer_than_the_lock_timeout_then_drains() {
    let s = setup("lock", 4, 1).await;
    let ids = s.enqueue(8000, 100).await;
    let _service = outbox_tests::db::Service::writing(&s.pool).await;
    let mut relay = s.relay(BATCH).spawn();
    wait_pending_below(&s.store, 7800, Duration::from_secs(60)).await;
    // Longer than the daemon's lock_timeout (10 s): claims and marks in flight time out and retry.
    let mut tx = s.pool.begin().await.unwrap();
    outbox_tests::db::exec(&mut *tx, "LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE").await;
    stays_up(&mut relay, Duration::from_secs(12), "under the lock").await;
    let during_lock = relay.count("lock timeout");
    tx.rollback().await.unwrap();
    drained(&s, &relay, Duration::from_secs(40)).await;
    relay.terminate();
    assert!(
        during_lock > 0,
        "no statement hit the lock timeout:\n{}",
        relay.tail(30)
    );
    let dups = s.check_within_a_batch_per_lane(&ids, BATCH).await;
    eprintln!(
        "table lock 12 s: {during_lock} lock timeouts ({} failed claims, {} failed marks), {dups} duplicates",
        relay.count("claim failed"),
        relay.count("store write failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_status_fails_run_retries_and_sigterm_exits_zero() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://postgres@127.0.0.1:{closed}/nowhere");
    let mut relay = RelayArgs::new(BIN, &url, "127.0.0.1:1", 100).spawn();
    let start = Instant::now();
    let out = Command::new(BIN)
        .args(["--database-url", &url, "status"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "status on an unreachable database must fail");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "status took {:?}",
        start.elapsed()
    );
    // Meanwhile `run` waits for the database, retrying (each attempt ends at the 10 s connect timeout).
    until("two retries logged", Duration::from_secs(60), || {
        assert!(relay.running(), "run gave up instead of retrying:\n{}", relay.tail(20));
        let seen = match relay.count("database not reachable; retrying") {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} retries logged:\n{}", relay.tail(20))),
        };
        std::future::ready(seen)
    })
    .await;
    let term = Instant::now();
    relay.signal("-TERM");
    assert_eq!(
        relay.wait_exit(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        relay.tail(20)
    );
    eprintln!(
        "unreachable database: status failed, run retried, SIGTERM exit after {:.1?}",
        term.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_longer_than_the_lease_then_back_loses_nothing() {
    let s = setup("outage", 4, 1).await;
    let (proxy, url) = behind_proxy(&s).await;
    let ids = s.enqueue(5000, 100).await;
    let mut relay = RelayArgs::new(BIN, &url, &s.bootstrap, BATCH)
        .lease_ttl_ms(TTL_MS)
        .spawn();
    wait_pending_below(&s.store, 4800, Duration::from_secs(60)).await;
    // Refused connections for longer than the lease and the 10 s connect timeout: the relay drops
    // its lanes, keeps retrying, and takes them back (new epochs) once the database answers again.
    proxy.cut();
    stays_up(&mut relay, Duration::from_secs(12), "during the outage").await;
    proxy.restore().await;
    drained(&s, &relay, Duration::from_secs(90)).await;
    relay.terminate();
    let dups = s.check_within_a_batch_per_lane(&ids, BATCH).await;
    eprintln!(
        "database outage 12 s: {} failed lease rounds, {dups} duplicates",
        relay.count("lease maintenance failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_database_outage_exits_within_the_grace_period() {
    let s = setup("outage-term", 4, 1).await;
    let (proxy, url) = behind_proxy(&s).await;
    let mut ids = s.enqueue(2000, 100).await;
    // Leases long enough that the relay still holds its 32 lanes when SIGTERM comes; 15 s grace.
    let cfg = std::env::temp_dir().join(format!("relay-term-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&cfg, "[relay]\nshutdown_grace_ms = 15000\n").unwrap();
    let args = RelayArgs::new(BIN, &url, &s.bootstrap, BATCH)
        .lease_ttl_ms(15_000)
        .args(["--config".to_owned(), cfg.display().to_string()]);
    let mut relay = args.spawn();
    wait_pending_below(&s.store, 1, Duration::from_secs(60)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let term = Instant::now();
    relay.signal("-TERM");
    // At most one connect timeout (10 s) for the lease round in progress, then the lanes stop and
    // the leases are given back within the grace period, or left to expire.
    let st = relay.wait_exit(Duration::from_secs(120));
    let took = term.elapsed();
    assert_eq!(st.code(), Some(0), "{}", relay.tail(20));
    assert!(
        took < Duration::from_secs(40),
        "SIGTERM took {took:?} during the outage:\n{}",
        relay.tail(20)
    );
    // The database is back: a new relay takes the lanes once the leases expired, nothing lost.
    proxy.restore().await;
    ids.extend(s.enqueue(1000, 100).await);
    let mut relay = args.spawn();
    drained(&s, &relay, Duration::from_secs(90)).await;
    relay.terminate();
    std::fs::remove_file(cfg).ok();
    let dups = s.check_within_a_batch_per_lane(&ids, BATCH).await;
    eprintln!("SIGTERM during a database outage: exit 0 after {took:.1?}; {dups} duplicates");
}
