//! The cases on a dedicated server: confirmation before marking, key order through a cut, a
//! restart mid-stream, and a killed server or cut connection reported `Unavailable`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::{Delivered, FailureKind, PublishError, Publisher, StoreAdmin, StoredMessage};
use uuid::Uuid;

use crate::embedded::{drained, start, test_config, wait_for, Running};
use crate::publisher_suite::delivery::{commit_rounds, outbox_db, publish_until_ok};
use crate::publisher_suite::{check_delivery, read_ids, stored, BrokerFixture, Received, BATCH};

/// A publisher that records what the one it wraps reported.
struct Watched {
    inner: Arc<dyn Publisher>,
    calls: AtomicUsize,
    outcomes: Mutex<Vec<Result<(), FailureKind>>>,
}

#[async_trait]
impl Publisher for Watched {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let out = self.inner.publish(batch).await;
        self.outcomes
            .lock()
            .unwrap()
            .extend(out.iter().map(|r| r.as_ref().map(|_| ()).map_err(|e| e.kind)));
        self.calls.fetch_add(1, Ordering::SeqCst);
        out
    }
}

impl Watched {
    fn new(inner: Arc<dyn Publisher>) -> Arc<Watched> {
        Arc::new(Watched {
            inner,
            calls: AtomicUsize::new(0),
            outcomes: Mutex::default(),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Outcomes reported so far: (delivered, failures by kind).
    fn summary(&self) -> (usize, HashMap<String, usize>) {
        let all = self.outcomes.lock().unwrap();
        let mut failed = HashMap::new();
        let mut ok = 0;
        for o in all.iter() {
            match o {
                Ok(()) => ok += 1,
                Err(k) => *failed.entry(format!("{k:?}")).or_insert(0) += 1,
            }
        }
        (ok, failed)
    }
}

/// Publishes `rows` directly; asserts every outcome is `Unavailable` (neither delivered, nor
/// counted as an attempt, nor dead-lettered) and came within the fixture's bound.
async fn assert_unavailable(fixture: &dyn BrokerFixture, publisher: &dyn Publisher, rows: &[StoredMessage], why: &str) {
    let bound = fixture.failure_bound();
    let started = Instant::now();
    let out = tokio::time::timeout(bound, publisher.publish(rows))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: publish while {why} did not return within {bound:?}",
                fixture.name()
            )
        });
    for (row, r) in rows.iter().zip(&out) {
        match r {
            Err(e) if e.kind == FailureKind::Unavailable => {}
            other => panic!(
                "{}: publish of {} while {why} must be Unavailable, was {other:?}",
                fixture.name(),
                row.id
            ),
        }
    }
    eprintln!(
        "{}: {} rows Unavailable after {:.1?} while {why}",
        fixture.name(),
        rows.len(),
        started.elapsed()
    );
}

/// Publishes through the relay while the server is cut: the rows stay pending (no `Ok` is
/// reported) for several publish rounds; after restore every row is marked and read back.
pub async fn confirm_before_mark(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let dest = fixture.destination().await;
    let publisher = fixture.publisher().await;
    publish_until_ok(&*publisher, &dest, Duration::from_secs(60)).await;
    let watched = Watched::new(publisher);
    let (pool, store) = outbox_db().await;

    fixture.cut().await;
    let ids = commit_rounds(&pool, &dest, 4, 5, Duration::from_millis(1)).await;
    let relay = start(store.clone(), watched.clone(), test_config().batch_size(BATCH));
    // Three rounds of publishes, each over and reported, while the server cannot confirm.
    let bound = fixture.failure_bound() * 4;
    wait_for("three publish rounds while cut", bound, || {
        let w = watched.clone();
        async move { w.calls() >= 3 }
    })
    .await;
    let (ok, failed) = watched.summary();
    assert_eq!(
        ok, 0,
        "{name}: a publish was confirmed while the server was cut ({failed:?})"
    );
    assert_eq!(
        failed.get("Retryable").copied().unwrap_or(0) + failed.get("Permanent").copied().unwrap_or(0),
        0,
        "{name}: a cut is Unavailable, never Retryable or Permanent: {failed:?}"
    );
    let pending = store.status().await.unwrap().pending;
    assert_eq!(
        pending,
        ids.len() as i64,
        "{name}: rows were marked while the server was cut"
    );

    fixture.restore().await;
    drained(&store, Duration::from_secs(120)).await;
    relay.stop().await;
    assert!(store.dead_letters(10).await.unwrap().is_empty(), "{name}: dead letters");
    let expect: HashSet<Uuid> = ids.into_iter().collect();
    let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
    let seen: Vec<Received> = seen.into_iter().filter(|r| expect.contains(&r.id)).collect();
    let dups = check_delivery(name, &seen, &expect);
    eprintln!(
        "{name}: confirm-before-mark: {} delivered after restore, {dups} duplicates",
        expect.len()
    );
}

/// Keys the writers of the mid-stream cases commit.
const KEYS: usize = 8;

/// The relay publishing while writers commit 150 paced rounds of [`KEYS`] keys, some of the
/// messages already on the broker.
struct Flowing {
    dest: String,
    pool: sqlx::PgPool,
    store: outbox::postgres::PgStore,
    relay: Running,
    writing: tokio::task::JoinHandle<Vec<Uuid>>,
}

impl Flowing {
    /// Starts the relay and the writers, and waits until 40 messages are on the broker (`outage`:
    /// what comes next).
    async fn start(fixture: &dyn BrokerFixture, outage: &str) -> Flowing {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let publisher = fixture.publisher().await;
        let (pool, store) = outbox_db().await;
        let relay = start(store.clone(), publisher, test_config().batch_size(BATCH));
        let writing = {
            let (pool, dest) = (pool.clone(), dest.clone());
            tokio::spawn(async move { commit_rounds(&pool, &dest, KEYS, 150, Duration::from_millis(40)).await })
        };
        let before = fixture.read(&dest, 40, Duration::from_secs(60)).await;
        assert!(
            before.len() >= 40,
            "{name}: the relay did not publish before the {outage}"
        );
        Flowing {
            dest,
            pool,
            store,
            relay,
            writing,
        }
    }

    /// Waits for the writers, drains (within `drain`) and stops the relay; then every message the
    /// writers and `more` committed arrives (read within `read`), each key's seqs in order,
    /// duplicates within one batch per lane, nothing dead-lettered. Logs the counts as `case`.
    async fn check(
        self,
        fixture: &dyn BrokerFixture,
        more: Vec<Uuid>,
        (drain, read): (Duration, Duration),
        case: &str,
    ) {
        let name = fixture.name();
        let mut ids = self.writing.await.unwrap();
        ids.extend(more);
        drained(&self.store, drain).await;
        self.relay.stop().await;
        assert!(
            self.store.dead_letters(10).await.unwrap().is_empty(),
            "{name}: dead letters"
        );
        let expect: HashSet<Uuid> = ids.into_iter().collect();
        let seen = read_ids(fixture, &self.dest, &expect, read).await;
        let dups = check_delivery(name, &seen, &expect);
        let bound = BATCH * KEYS;
        assert!(dups <= bound, "{name}: {dups} duplicates (bound {bound})");
        eprintln!("{name}: {case}: {} delivered, {dups} duplicates", expect.len());
    }
}

/// Writers commit 8 keys while the relay runs; the server is cut mid-stream and restored. Every
/// committed message arrives, each key's seqs in order, duplicates within one batch per lane.
pub async fn key_order_through_a_cut(fixture: Arc<dyn BrokerFixture>) {
    let flowing = Flowing::start(&*fixture, "cut").await;
    fixture.cut().await;
    let cut_at = flowing.store.status().await.unwrap().pending;
    // Writers keep committing while cut: the backlog grows.
    wait_for("the backlog to grow while cut", Duration::from_secs(60), || {
        let store = flowing.store.clone();
        async move { store.status().await.unwrap().pending >= cut_at + 40 }
    })
    .await;
    fixture.restore().await;
    let within = (Duration::from_secs(120), Duration::from_secs(60));
    flowing
        .check(&*fixture, Vec::new(), within, "key order through a cut")
        .await;
}

/// Writers commit while the server is SIGKILLed and started again on its storage: 0 lost, each
/// key's seqs in order, duplicates within one batch per lane, nothing dead-lettered.
pub async fn restart_mid_stream(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let flowing = Flowing::start(&*fixture, "kill").await;
    fixture.kill().await;
    // Commits while the server is down, whether or not the paced writer is still going (on a
    // slow machine it can finish before the kill): none of them can be marked before the restart.
    let during = commit_rounds(&flowing.pool, &flowing.dest, KEYS, 10, Duration::from_millis(40)).await;
    let pending = flowing.store.status().await.unwrap().pending;
    assert!(
        pending >= during.len() as i64,
        "{name}: {pending} pending, but {} were committed while the server is down",
        during.len()
    );
    fixture.start().await;
    let within = (Duration::from_secs(180), Duration::from_secs(90));
    flowing.check(&*fixture, during, within, "restart mid-stream").await;
}

/// A connected publisher whose server is SIGKILLed reports every message `Unavailable` within
/// the fixture's bound; once the server is started again, it publishes without being rebuilt.
pub async fn killed_is_unavailable(fixture: Arc<dyn BrokerFixture>) {
    unavailable_then_back(fixture, Outage::Kill).await;
}

/// A connected publisher that is cut off reports every message `Unavailable` within the
/// fixture's bound; once restored, it publishes without being rebuilt.
pub async fn cut_is_unavailable(fixture: Arc<dyn BrokerFixture>) {
    unavailable_then_back(fixture, Outage::Cut).await;
}

/// What takes the server away from a connected publisher.
#[derive(Clone, Copy)]
enum Outage {
    /// SIGKILL, then started again on its storage.
    Kill,
    /// The connection cut, then restored.
    Cut,
}

async fn unavailable_then_back(fixture: Arc<dyn BrokerFixture>, outage: Outage) {
    let dest = fixture.destination().await;
    let publisher = fixture.publisher().await;
    publish_until_ok(&*publisher, &dest, Duration::from_secs(60)).await;
    let (payload, during, after) = match outage {
        Outage::Kill => {
            fixture.kill().await;
            (&b"while down"[..], "the server is killed", "published after start")
        }
        Outage::Cut => {
            fixture.cut().await;
            (&b"while cut"[..], "the connection is cut", "published after restore")
        }
    };
    let rows: Vec<StoredMessage> = (1..=5)
        .map(|i| stored(i, &dest, Some(&format!("k{}", i % 2)), Some(i), payload.to_vec()))
        .collect();
    assert_unavailable(&*fixture, &*publisher, &rows, during).await;
    match outage {
        Outage::Kill => fixture.start().await,
        Outage::Cut => fixture.restore().await,
    }
    let id = publish_until_ok(&*publisher, &dest, Duration::from_secs(90)).await;
    let seen = read_ids(&*fixture, &dest, &HashSet::from([id]), Duration::from_secs(60)).await;
    assert!(seen.iter().any(|r| r.id == id), "{}: {after}", fixture.name());
}
