//! Fault injection on the `outbox-relay` daemon as an operator runs it: a crash at each point of a
//! batch's life (`OUTBOX_RELAY_CRASH_AT`), a relay paused past its lease while another takes over,
//! database connections killed mid-drain, the outbox table locked for longer than the lock timeout,
//! an unreachable database, and four relays killed and restarted at random on a hot key.
//!
//! Every scenario checks with an independent Kafka reader: every committed message arrived, nothing
//! else did, per key the first arrivals are in seq order without gaps, duplicates stay bounded, and
//! the backlog drains to zero without dead letters.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use outbox::{Message, Store, StoreAdmin, LANES};
use outbox_tests::daemon::{db_url, enqueue_all, pending, wait_pending_below, RelayArgs};
use outbox_tests::kafka::{broker, check_delivery, create_topic, read_until, topic};
use outbox_tests::proxy::DbProxy;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
/// Short leases, so a restarted relay takes the dead one's lanes over within seconds.
const TTL_MS: u64 = 2000;

/// Relay processes allowed at once across this file's tests (each may hold up to 16 database
/// connections, the server allows 100 in all): a test takes one permit per relay it runs.
static RELAYS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(5);

async fn relays(n: u32) -> tokio::sync::SemaphorePermit<'static> {
    RELAYS.acquire_many(n).await.unwrap()
}

struct Setup {
    bootstrap: String,
    topic: String,
    pool: sqlx::PgPool,
    store: outbox::postgres::PgStore,
    url: String,
}

async fn setup(prefix: &str, partitions: i32) -> Setup {
    let bootstrap = broker();
    let topic = topic(prefix);
    create_topic(&bootstrap, &topic, partitions).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let url = db_url(&pool);
    Setup {
        bootstrap,
        topic,
        pool,
        store,
        url,
    }
}

impl Setup {
    fn relay(&self, batch: usize) -> RelayArgs {
        RelayArgs::new(BIN, &self.url, &self.bootstrap, batch).lease_ttl_ms(TTL_MS)
    }

    /// Reads the topic until every id arrived and checks delivery; returns the duplicates.
    async fn check(&self, ids: &HashSet<uuid::Uuid>) -> usize {
        let seen = read_until(
            &self.bootstrap,
            &self.topic,
            ids,
            Duration::from_secs(90),
            Duration::from_millis(500),
        )
        .await;
        check_delivery(&seen, ids)
    }

    async fn assert_no_dead_letters(&self) {
        let dl = self.store.dead_letters(5).await.unwrap();
        assert!(dl.is_empty(), "nothing is poison here, yet: {dl:?}");
    }
}

/// Crashes the relay at `point` (the n-th time any lane passes it), restarts it without the crash
/// point, and checks nothing was lost, duplicates stay within one batch per lane, order held.
async fn crash_then_restart(point: &str) {
    let _permit = relays(1).await;
    let s = setup(&format!("crash-{point}"), 4).await;
    let batch = 50;
    let ids = enqueue_all(&s.pool, &s.topic, 3000, 100).await;
    let mut relay = s
        .relay(batch)
        .env("OUTBOX_RELAY_CRASH_AT", &format!("{point}:20"))
        .spawn();
    let st = relay.wait_exit(Duration::from_secs(60));
    assert_eq!(
        st.signal(),
        Some(6),
        "the relay must abort (SIGABRT) at {point}: {st:?}\n{}",
        relay.tail(20)
    );
    assert_eq!(
        relay.count("OUTBOX_RELAY_CRASH_AT: aborting at"),
        1,
        "{}",
        relay.tail(20)
    );
    let left = pending(&s.store).await;
    assert!(left > 0, "crashed before the end");

    // The restarted relay takes the lanes over once the dead relay's leases expire.
    let started = Instant::now();
    let mut relay = s.relay(batch).spawn();
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    let took = started.elapsed();
    relay.terminate();
    s.assert_no_dead_letters().await;

    let dups = s.check(&ids).await;
    let bound = batch * LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
    eprintln!("crash at {point}: {left} pending at the crash, drained {took:.1?} after the restart, {dups} duplicates (bound {bound})");
}

#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features outbox-cli/failpoints (.ci/test)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_claim_then_restart_loses_nothing() {
    crash_then_restart("after_claim").await;
}

#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features outbox-cli/failpoints (.ci/test)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_publish_then_restart_loses_nothing() {
    crash_then_restart("during_publish").await;
}

#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features outbox-cli/failpoints (.ci/test)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_mark_then_restart_loses_nothing() {
    crash_then_restart("before_mark").await;
}

#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features outbox-cli/failpoints (.ci/test)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_mark_then_restart_loses_nothing() {
    crash_then_restart("during_mark").await;
}

#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features outbox-cli/failpoints (.ci/test)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_mark_then_restart_loses_nothing() {
    crash_then_restart("after_mark").await;
}

/// Lanes owned by the relay process `pid` (owners are `<host>-<pid>-<random>`).
async fn lanes_of(store: &dyn Store, pid: u32) -> usize {
    let tag = format!("-{pid}-");
    let st = store.status().await.unwrap();
    st.lanes
        .iter()
        .filter(|l| l.owner.as_deref().is_some_and(|o| o.contains(&tag)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_paused_past_its_lease_cannot_mark_after_another_took_over() {
    let _permit = relays(2).await;
    let s = setup("paused", 4).await;
    let batch = 100;
    let ids = enqueue_all(&s.pool, &s.topic, 20_000, 200).await;
    let mut a = s.relay(batch).spawn();
    wait_pending_below(&s.store, 19_000, Duration::from_secs(60)).await;
    // Frozen mid-drain: batches claimed and produced, not marked.
    a.signal("-STOP");
    let mut b = s.relay(batch).spawn();
    // A's heartbeat and leases expire; B takes every lane (each with a new epoch).
    let start = Instant::now();
    while lanes_of(&s.store, b.pid()).await < LANES as usize {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "B never took all lanes over:\n{}",
            b.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lanes_of(&s.store, a.pid()).await, 0);
    a.signal("-CONT");
    // A wakes up believing it owns its lanes: its marks carry the old epoch and are refused.
    let start = Instant::now();
    while a.count("lease lost") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "A never noticed it lost its lanes:\n{}",
            a.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    for r in [&mut a, &mut b] {
        r.terminate();
    }
    s.assert_no_dead_letters().await;
    let dups = s.check(&ids).await;
    // A's published-but-unmarked batches (one per lane) are re-sent by B: one copy more each.
    let bound = batch * LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
    eprintln!(
        "paused relay: {} stale marks refused, {} lanes stopped on renewal, {dups} duplicates",
        a.count("another relay owns the lane now"),
        a.count("lease lost; stopping lane")
    );
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_while_draining_lose_nothing() {
    let _permit = relays(1).await;
    let s = setup("pgkill", 4).await;
    let batch = 100;
    let ids = enqueue_all(&s.pool, &s.topic, 10_000, 100).await;
    let obs = observer(&s.pool).await;
    let store = outbox::postgres::PgStore::new(obs.clone());
    let db = s.pool.connect_options().get_database().unwrap().to_owned();
    let mut relay = s.relay(batch).spawn();
    let mut rng = rand::thread_rng();
    let (mut killed, mut rounds) = (0i64, 0);
    // Every connection of the relay (claims, marks, lease upkeep, LISTEN), every 100-300 ms, for
    // 40 rounds or until the backlog is gone; then it must drain on its own.
    while rounds < 40 && pending(&store).await > 0 {
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
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..300))).await;
    }
    wait_pending_below(&store, 1, Duration::from_secs(90)).await;
    relay.terminate();
    assert!(store.dead_letters(5).await.unwrap().is_empty());
    let (claims, writes, upkeep) = (
        relay.count("claim failed"),
        relay.count("store write failed"),
        relay.count("lease maintenance failed"),
    );
    assert!(
        killed > 0 && claims + writes + upkeep > 0,
        "the kills never hit the relay ({killed} killed)"
    );
    let dups = s.check(&ids).await;
    // Only a lost lease (lease upkeep failing for longer than the TTL) re-sends a batch per lane.
    let bound = batch * LANES as usize * (1 + upkeep);
    assert!(
        dups <= bound,
        "{dups} duplicates exceed one batch per lane per failed lease round ({bound})"
    );
    eprintln!(
        "killed connections: {killed} backends in {rounds} rounds; relay saw {claims} failed claims, {writes} failed \
         marks, {upkeep} failed lease rounds; {dups} duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_table_locked_longer_than_the_lock_timeout_then_drains() {
    let _permit = relays(1).await;
    let s = setup("lock", 4).await;
    let batch = 100;
    let ids = enqueue_all(&s.pool, &s.topic, 8000, 100).await;
    let mut relay = s.relay(batch).spawn();
    wait_pending_below(&s.store, 7800, Duration::from_secs(60)).await;
    // Longer than the daemon's lock_timeout (10 s): claims and marks in flight time out and retry.
    let mut tx = s.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let locked = Instant::now();
    while locked.elapsed() < Duration::from_secs(12) {
        assert!(relay.running(), "the relay died under the lock:\n{}", relay.tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during_lock = relay.count("lock timeout");
    tx.rollback().await.unwrap();
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    relay.terminate();
    assert!(
        during_lock > 0,
        "no statement hit the lock timeout:\n{}",
        relay.tail(30)
    );
    s.assert_no_dead_letters().await;
    let dups = s.check(&ids).await;
    let bound = batch * LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
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
    while relay.count("database not reachable; retrying") < 2 {
        assert!(relay.running(), "run gave up instead of retrying:\n{}", relay.tail(20));
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no retry logged:\n{}",
            relay.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
async fn four_relays_killed_and_restarted_at_random_on_a_hot_key() {
    let _permit = relays(4).await;
    let s = setup("four", 8).await;
    let batch = 100;
    // At most the share of three relays each (ceil(32 / 3)): survivors can still take every lane of
    // a dead one, and none grabs (and keeps connections for) all 32 lanes at start.
    let cfg = std::env::temp_dir().join(format!("relay-four-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&cfg, "[relay]\nmax_lanes = 11\n").unwrap();
    let cfg_arg = ["--config".to_owned(), cfg.display().to_string()];
    let seed: u64 = std::env::var("OUTBOX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("four relays: seed {seed} (OUTBOX_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut relays: Vec<_> = (0..4)
        .map(|_| s.relay(batch).args(cfg_arg.clone()).log("warn").spawn())
        .collect();

    // 10,000 committed messages: 50 keys plus one hot key with 40% of them; rolled-back ones too.
    let writer = {
        let (pool, t) = (s.pool.clone(), s.topic.clone());
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            for b in 0..40 {
                let msgs: Vec<Message> = (0..250)
                    .map(|i| {
                        let key = if i % 5 < 2 {
                            "hot".to_owned()
                        } else {
                            format!("k{}", (b * 7 + i) % 50)
                        };
                        Message::new(t.clone(), format!("{b}-{i}")).key(key)
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                tx.commit().await.unwrap();
                ids.extend(msgs.iter().map(|m| m.id()));
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue(&mut tx, &Message::new(t.clone(), "rolled back").key("hot"))
                    .await
                    .unwrap();
                tx.rollback().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ids
        })
    };
    let start = Instant::now();
    let mut kills = 0;
    while kills < 8 || !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
        if writer.is_finished() && pending(&s.store).await == 0 {
            break;
        }
        let i = rng.gen_range(0..relays.len());
        relays[i].kill();
        kills += 1;
        if rng.gen_bool(0.5) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
        }
        relays[i] = s.relay(batch).args(cfg_arg.clone()).log("warn").spawn();
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "still killing after two minutes"
        );
    }
    let ids = writer.await.unwrap();
    assert_eq!(ids.len(), 10_000);
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    for r in &mut relays {
        r.terminate();
    }
    std::fs::remove_file(cfg).ok();
    s.assert_no_dead_letters().await;
    let dups = s.check(&ids).await;
    let bound = kills * batch * LANES as usize;
    assert!(
        dups <= bound,
        "{dups} duplicates exceed one batch per lane per kill ({bound})"
    );
    eprintln!(
        "four relays: {kills} kills in {:.1?}, {dups} duplicates (bound {bound})",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_longer_than_the_lease_then_back_loses_nothing() {
    let _permit = relays(1).await;
    let s = setup("outage", 4).await;
    let proxy = DbProxy::start().await;
    let db = s.pool.connect_options().get_database().unwrap().to_owned();
    let url = format!("postgres://postgres@127.0.0.1:{}/{db}", proxy.port);
    let batch = 100;
    let ids = enqueue_all(&s.pool, &s.topic, 5000, 100).await;
    let mut relay = RelayArgs::new(BIN, &url, &s.bootstrap, batch)
        .lease_ttl_ms(TTL_MS)
        .spawn();
    wait_pending_below(&s.store, 4800, Duration::from_secs(60)).await;
    // Refused connections for longer than the lease and the 10 s connect timeout: the relay drops
    // its lanes, keeps retrying, and takes them back (new epochs) once the database answers again.
    proxy.cut();
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(12) {
        assert!(relay.running(), "the relay died during the outage:\n{}", relay.tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.restore().await;
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    relay.terminate();
    s.assert_no_dead_letters().await;
    let dups = s.check(&ids).await;
    let bound = batch * LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
    eprintln!(
        "database outage 12 s: {} failed lease rounds, {dups} duplicates",
        relay.count("lease maintenance failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_database_outage_exits_within_the_grace_period() {
    let _permit = relays(1).await;
    let s = setup("outage-term", 4).await;
    let proxy = DbProxy::start().await;
    let db = s.pool.connect_options().get_database().unwrap().to_owned();
    let url = format!("postgres://postgres@127.0.0.1:{}/{db}", proxy.port);
    let batch = 100;
    let mut ids = enqueue_all(&s.pool, &s.topic, 2000, 100).await;
    // Leases long enough that the relay still holds its 32 lanes when SIGTERM comes; 15 s grace.
    let cfg = std::env::temp_dir().join(format!("relay-term-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&cfg, "[relay]\nshutdown_grace_ms = 15000\n").unwrap();
    let args = RelayArgs::new(BIN, &url, &s.bootstrap, batch)
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
    ids.extend(enqueue_all(&s.pool, &s.topic, 1000, 100).await);
    let mut relay = args.spawn();
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    relay.terminate();
    std::fs::remove_file(cfg).ok();
    s.assert_no_dead_letters().await;
    let dups = s.check(&ids).await;
    let bound = batch * LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
    eprintln!("SIGTERM during a database outage: exit 0 after {took:.1?}; {dups} duplicates");
}
