//! Fault injection on the `outbox-relay` daemon as an operator runs it: a crash at each point of a
//! batch's life (`OUTBOX_RELAY_CRASH_AT`), a relay paused past its lease while another takes over,
//! database connections killed mid-drain, the outbox table locked for longer than the lock timeout,
//! an unreachable database, and four relays killed and restarted at random on a hot key.
//!
//! Every scenario checks with an independent Kafka reader: every committed message arrived, nothing
//! else did, per key the first arrivals are in seq order without gaps, duplicates stay bounded, and
//! the backlog drains to zero without dead letters.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox::{Message, Store, StoreAdmin, LANES};
use outbox_tests::daemon::{db_url, enqueue_all, pending, wait_pending_below, RelayArgs};
use outbox_tests::kafka::{check_delivery, read_all, PgTopic};
use outbox_tests::wait::until;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
/// Short leases, so a restarted relay takes the dead one's lanes over within seconds.
const TTL_MS: u64 = 2000;
/// Rows per batch of the relays these tests run (the crash-point tests use smaller batches).
const BATCH: usize = 100;

/// Relay processes allowed at once across this file's tests (each may hold up to 16 database
/// connections, the server allows 100 in all): a test takes one permit per relay it runs.
static RELAYS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(5);

#[path = "crashes/database.rs"]
mod database;
#[path = "crashes/restart.rs"]
mod restart;

/// One test's topic and database, and its permits for the relays it runs.
struct Setup {
    _permit: tokio::sync::SemaphorePermit<'static>,
    bootstrap: String,
    topic: String,
    pool: sqlx::PgPool,
    store: outbox::postgres::PgStore,
    url: String,
}

/// Waits for permits for `relays` relay processes, then makes a topic of `partitions` partitions
/// called `prefix-…` and a fresh database.
async fn setup(prefix: &str, partitions: i32, relays: u32) -> Setup {
    let permit = RELAYS.acquire_many(relays).await.unwrap();
    let (bootstrap, topic, pool, store) = PgTopic::new(prefix, partitions).await.into_parts();
    let url = db_url(&pool);
    Setup {
        _permit: permit,
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

    /// Enqueues `n` messages on the topic over `keys` keys ([`enqueue_all`]); returns their ids.
    async fn enqueue(&self, n: usize, keys: usize) -> HashSet<uuid::Uuid> {
        enqueue_all(&self.pool, &self.topic, n, keys).await
    }

    /// Reads the topic until every id arrived and checks delivery; returns the duplicates.
    async fn check(&self, ids: &HashSet<uuid::Uuid>) -> usize {
        let seen = read_all(&self.bootstrap, &self.topic, ids).await;
        check_delivery(&seen, ids)
    }

    /// Nothing dead-lettered, [`Setup::check`], and at most one batch per lane sent twice (a relay
    /// that stopped between its publish and its mark); returns the duplicates.
    async fn check_within_a_batch_per_lane(&self, ids: &HashSet<uuid::Uuid>, batch: usize) -> usize {
        self.assert_no_dead_letters().await;
        let dups = self.check(ids).await;
        let bound = batch * LANES as usize;
        assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
        dups
    }

    async fn assert_no_dead_letters(&self) {
        let dl = self.store.dead_letters(5).await.unwrap();
        assert!(dl.is_empty(), "nothing is poison here, yet: {dl:?}");
    }
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
    let s = setup("paused", 4, 2).await;
    let ids = s.enqueue(20_000, 200).await;
    let mut a = s.relay(BATCH).spawn();
    wait_pending_below(&s.store, 19_000, Duration::from_secs(60)).await;
    // Frozen mid-drain: batches claimed and produced, not marked.
    a.signal("-STOP");
    let mut b = s.relay(BATCH).spawn();
    // A's heartbeat and leases expire; B takes every lane (each with a new epoch).
    until("B took every lane over", Duration::from_secs(30), || async {
        match lanes_of(&s.store, b.pid()).await {
            n if n == LANES as usize => Ok(()),
            n => Err(format!("B holds {n}:\n{}", b.tail(20))),
        }
    })
    .await;
    assert_eq!(lanes_of(&s.store, a.pid()).await, 0);
    a.signal("-CONT");
    // A wakes up believing it owns its lanes: its marks carry the old epoch and are refused.
    until("A noticed it lost its lanes", Duration::from_secs(30), || async {
        match a.count("lease lost") {
            0 => Err(a.tail(30)),
            _ => Ok(()),
        }
    })
    .await;
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    for r in [&mut a, &mut b] {
        r.terminate();
    }
    // A's published-but-unmarked batches (one per lane) are re-sent by B: one copy more each.
    let dups = s.check_within_a_batch_per_lane(&ids, BATCH).await;
    eprintln!(
        "paused relay: {} stale marks refused, {} lanes stopped on renewal, {dups} duplicates",
        a.count("another relay owns the lane now"),
        a.count("lease lost; stopping lane")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_killed_and_restarted_at_random_on_a_hot_key() {
    let s = setup("four", 8, 4).await;
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
        .map(|_| s.relay(BATCH).args(cfg_arg.clone()).log("warn").spawn())
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
                outbox_tests::db::commit_batch(&pool, &msgs).await;
                ids.extend(msgs.iter().map(|m| m.id()));
                outbox_tests::db::roll_back(&pool, &[Message::new(t.clone(), "rolled back").key("hot")]).await;
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
        relays[i] = s.relay(BATCH).args(cfg_arg.clone()).log("warn").spawn();
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
    let bound = kills * BATCH * LANES as usize;
    assert!(
        dups <= bound,
        "{dups} duplicates exceed one batch per lane per kill ({bound})"
    );
    eprintln!(
        "four relays: {kills} kills in {:.1?}, {dups} duplicates (bound {bound})",
        start.elapsed()
    );
}
