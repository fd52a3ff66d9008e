//! The publisher conformance suite: what every [`outbox::Publisher`] must guarantee, checked against
//! its real broker through a [`BrokerFixture`]. A broker adapter passes it with one macro call:
//!
//! ```ignore
//! outbox_tests::publisher_suite!(
//!     shared = MyFixture::shared().await,
//!     dedicated = MyFixture::dedicated().await,
//! );
//! ```
//!
//! Each expression is evaluated inside the async body of every generated test (so it may use
//! `.await`); its value is any type that implements [`BrokerFixture`]: a fixture struct, or an
//! `Arc<dyn BrokerFixture>` (the trait is implemented for `Arc<T>`). `shared` is built once per
//! test on the server every test uses (only [`BrokerFixture::destination`] isolates the tests);
//! `dedicated` is a server of the test's own, which the test kills, restarts, cuts and restores. At
//! most [`dedicated_parallelism`] dedicated fixtures exist at a time in one test binary.
//!
//! The generated tests (one per guarantee, each named `publisher_...`):
//!
//! | test | fixture | guarantee |
//! |------|---------|-----------|
//! | `publisher_confirms_before_the_relay_marks` | dedicated | no row is marked while the server is cut; all arrive after restore |
//! | `publisher_keeps_key_order_through_a_cut` | dedicated | per-key seqs in order through a cut mid-stream, duplicates bounded |
//! | `publisher_restart_mid_stream_loses_nothing` | dedicated | server SIGKILLed and restarted while writers commit: 0 lost, order kept |
//! | `publisher_killed_server_is_unavailable` | dedicated | every outcome `Unavailable` within a bound, then `Ok` after start |
//! | `publisher_cut_connection_is_unavailable_then_recovers` | dedicated | same for a cut connection |
//! | `publisher_oversize_is_permanent` | shared | a payload the broker refuses as too large is `Permanent` |
//! | `publisher_missing_destination_is_permanent` | shared | a destination the broker does not have is `Permanent` |
//! | `publisher_mixed_batch_fails_only_the_bad_message` | shared | one bad destination in a batch fails that message only |
//! | `publisher_mixed_batch_through_the_relay` | shared | the relay dead-letters the bad one, the others arrive in order |
//! | `publisher_carries_headers_end_to_end` | shared | id, key, seq, source, traceparent, a user header and raw payload bytes |
//!
//! `Retryable` is the classification left to each adapter's own tests: no failure provokes it the
//! same way on every broker. The suite checks that none of the failures above is reported as
//! `Retryable` (an outage must not count attempts, a poison message must not be retried).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::{Delivered, FailureKind, Message, PublishError, Publisher, StoreAdmin, StoredMessage};
use uuid::Uuid;

use crate::embedded::{drained, start, test_config, wait_for};

/// A message as an independent reader of the broker saw it (not the adapter's own consumer).
#[derive(Debug, Clone)]
pub struct Received {
    /// `outbox-id` header.
    pub id: uuid::Uuid,
    /// `outbox-key` header (or the broker's key/subject part).
    pub key: Option<String>,
    /// `outbox-seq` header.
    pub seq: Option<i64>,
    /// `outbox-source` header.
    pub source: Option<String>,
    /// Every header as sent.
    pub headers: Vec<(String, String)>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// What the suite needs from one broker. Tests run in parallel: `destination()` is unique per call.
#[async_trait::async_trait]
pub trait BrokerFixture: Send + Sync + 'static {
    /// "kafka", "rabbitmq", "nats": used in names and logs.
    fn name(&self) -> &'static str;
    /// Creates a fresh destination (topic / exchange+queue binding / stream subject) that an outbox
    /// message names in `Message::new(destination, ..)`; the reader can read it back from the start.
    async fn destination(&self) -> String;
    /// A destination the broker refuses as missing (no such topic with auto-create off, unroutable,
    /// no stream): publishing there must be a Permanent failure.
    async fn missing_destination(&self) -> String;
    /// A new publisher under test connected to this fixture's server, with short timeouts suitable
    /// for tests (a confirmation that does not come within ~5 s is Unavailable).
    async fn publisher(&self) -> std::sync::Arc<dyn outbox::Publisher>;
    /// Everything on `destination` so far, in broker order per key, read by an independent client;
    /// waits until at least `at_least` messages are there or `timeout` passed, then returns what it has.
    async fn read(&self, destination: &str, at_least: usize, timeout: std::time::Duration) -> Vec<Received>;
    /// A payload size in bytes that the broker refuses as too large.
    fn oversize(&self) -> usize;
    /// Kills the server abruptly (SIGKILL). Only called on a dedicated fixture.
    async fn kill(&self);
    /// Starts the killed server again on the same storage and port; returns when it takes publishes.
    async fn start(&self);
    /// Cuts the publisher off (e.g. a TcpProxy in front of the server is closed: open connections
    /// drop, new ones are refused). Only called on a dedicated fixture.
    async fn cut(&self);
    /// Restores what `cut` took away.
    async fn restore(&self);
    /// How long a publish may take to report a failure when the server is gone (killed or cut):
    /// the publisher's confirmation timeout plus slack. Defaults to 30 s.
    fn failure_bound(&self) -> Duration {
        Duration::from_secs(30)
    }
}

#[async_trait::async_trait]
impl<T: BrokerFixture + ?Sized> BrokerFixture for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn destination(&self) -> String {
        (**self).destination().await
    }
    async fn missing_destination(&self) -> String {
        (**self).missing_destination().await
    }
    async fn publisher(&self) -> Arc<dyn Publisher> {
        (**self).publisher().await
    }
    async fn read(&self, destination: &str, at_least: usize, timeout: Duration) -> Vec<Received> {
        (**self).read(destination, at_least, timeout).await
    }
    fn oversize(&self) -> usize {
        (**self).oversize()
    }
    async fn kill(&self) {
        (**self).kill().await
    }
    async fn start(&self) {
        (**self).start().await
    }
    async fn cut(&self) {
        (**self).cut().await
    }
    async fn restore(&self) {
        (**self).restore().await
    }
    fn failure_bound(&self) -> Duration {
        (**self).failure_bound()
    }
}

/// Expands to one `#[tokio::test]` per guarantee of the publisher conformance suite (see the
/// [`publisher_suite`](crate::publisher_suite) module for the list and the fixture expressions).
/// The calling crate needs `outbox-tests` and `tokio` (with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! publisher_suite {
    (shared = $shared:expr, dedicated = $dedicated:expr $(,)?) => {
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_confirms_before_the_relay_marks,
            confirm_before_mark
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_keeps_key_order_through_a_cut,
            key_order_through_a_cut
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_restart_mid_stream_loses_nothing,
            restart_mid_stream
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_killed_server_is_unavailable,
            killed_is_unavailable
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_cut_connection_is_unavailable_then_recovers,
            cut_is_unavailable
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_oversize_is_permanent,
            oversize_is_permanent
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_missing_destination_is_permanent,
            missing_destination_is_permanent
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_mixed_batch_fails_only_the_bad_message,
            mixed_batch
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_mixed_batch_through_the_relay,
            mixed_batch_relay
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_carries_headers_end_to_end,
            headers_end_to_end
        );
    };
}

/// One generated test of [`publisher_suite!`] (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __publisher_case {
    (shared, $fixture:expr, $test:ident, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let fixture = $crate::publisher_suite::fixture($fixture);
            $crate::publisher_suite::cases::$case(fixture).await;
        }
    };
    (dedicated, $fixture:expr, $test:ident, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let _slot = $crate::publisher_suite::dedicated_slot().await;
            let fixture = $crate::publisher_suite::fixture($fixture);
            $crate::publisher_suite::cases::$case(fixture).await;
        }
    };
}

/// The fixture as the cases take it.
pub fn fixture<F: BrokerFixture>(f: F) -> Arc<dyn BrokerFixture> {
    Arc::new(f)
}

/// How many dedicated fixtures (servers of a test's own) may exist at once in one test binary:
/// `OUTBOX_SUITE_DEDICATED`, default 2 (a broker server is heavy on a small machine).
pub fn dedicated_parallelism() -> usize {
    std::env::var("OUTBOX_SUITE_DEDICATED")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// Waits for a turn to build a dedicated fixture; the turn ends when the permit is dropped.
pub async fn dedicated_slot() -> tokio::sync::SemaphorePermit<'static> {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS
        .get_or_init(|| tokio::sync::Semaphore::new(dedicated_parallelism()))
        .acquire()
        .await
        .expect("never closed")
}

/// Rows per lane per relay round in the suite's relays: also the duplicate bound per lane.
pub const BATCH: usize = 50;

/// A row as the relay would claim it, for direct `Publisher::publish` calls.
pub fn stored(pos: i64, destination: &str, key: Option<&str>, seq: Option<i64>, payload: Vec<u8>) -> StoredMessage {
    let id = Uuid::now_v7();
    let row = StoredMessage::new(pos, id, outbox::lane_of(key, id, outbox::LANES), destination, payload);
    match (key, seq) {
        (Some(key), Some(seq)) => row.key(key, seq),
        _ => row,
    }
}

/// Reads `destination` until every id of `expect` is there or `timeout` passed (the reader may
/// return duplicates, so one read of `expect.len()` messages is not always enough).
pub async fn read_ids(
    fixture: &dyn BrokerFixture,
    destination: &str,
    expect: &HashSet<Uuid>,
    timeout: Duration,
) -> Vec<Received> {
    let start = Instant::now();
    let mut at_least = expect.len();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let seen = fixture.read(destination, at_least, left).await;
        let ids: HashSet<Uuid> = seen.iter().map(|r| r.id).collect();
        let missing = expect.difference(&ids).count();
        if missing == 0 || start.elapsed() >= timeout {
            return seen;
        }
        at_least = seen.len() + missing;
    }
}

/// Checks what a reader saw: every expected id arrived, nothing else did, and per key the first
/// arrival of each seq is 1, 2, 3... in broker order (duplicates may repeat earlier seqs).
/// Returns the number of duplicates.
pub fn check_delivery(name: &str, seen: &[Received], expect: &HashSet<Uuid>) -> usize {
    let ids: HashSet<Uuid> = seen.iter().map(|s| s.id).collect();
    let missing: Vec<_> = expect.difference(&ids).collect();
    assert!(
        missing.is_empty(),
        "{name}: {} committed messages never arrived, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let unexpected: Vec<_> = ids.difference(expect).collect();
    assert!(
        unexpected.is_empty(),
        "{name}: messages that were never committed arrived: {unexpected:?}"
    );
    let mut high: HashMap<&str, i64> = HashMap::new();
    let mut first: HashSet<Uuid> = HashSet::new();
    for s in seen {
        if !first.insert(s.id) {
            continue;
        }
        if let (Some(k), Some(q)) = (s.key.as_deref(), s.seq) {
            let h = high.entry(k).or_insert(0);
            assert_eq!(
                q,
                *h + 1,
                "{name}: key {k}: seq {q} arrived first after seq {h} (gap or reordering)"
            );
            *h = q;
        }
    }
    seen.len() - first.len()
}

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

/// A fresh outbox database for one test.
async fn outbox_db() -> (sqlx::PgPool, outbox::postgres::PgStore) {
    let pool = crate::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    (pool, store)
}

/// Commits `per_key` messages for each of `keys` keys, one transaction per round (one message per
/// key), one round every `every`; returns the ids in commit order.
pub(crate) async fn commit_rounds(
    pool: &sqlx::PgPool,
    destination: &str,
    keys: usize,
    per_key: usize,
    every: Duration,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(every);
    for round in 0..per_key {
        tick.tick().await;
        let msgs: Vec<Message> = (0..keys)
            .map(|k| Message::new(destination, format!("r{round}k{k}")).key(format!("key-{k}")))
            .collect();
        let mut tx = pool.begin().await.unwrap();
        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        ids.extend(msgs.iter().map(|m| m.id()));
    }
    ids
}

/// Publishes one message directly until the broker confirms it (used to know the publisher is
/// connected, and that the server takes publishes again after an outage).
async fn publish_until_ok(publisher: &dyn Publisher, destination: &str, within: Duration) -> Uuid {
    let start = Instant::now();
    let mut pos = 0;
    loop {
        pos += 1;
        let row = stored(pos, destination, None, None, b"probe".to_vec());
        match publisher.publish(std::slice::from_ref(&row)).await.remove(0) {
            Ok(_) => return row.id,
            Err(e) => {
                assert!(
                    start.elapsed() < within,
                    "the broker did not confirm a publish within {within:?}: last {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
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

/// The suite's test bodies, called by the tests [`publisher_suite!`] generates.
pub mod cases {
    use super::*;

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

    /// Writers commit 8 keys while the relay runs; the server is cut mid-stream and restored. Every
    /// committed message arrives, each key's seqs in order, duplicates within one batch per lane.
    pub async fn key_order_through_a_cut(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let publisher = fixture.publisher().await;
        let (pool, store) = outbox_db().await;
        let relay = start(store.clone(), publisher, test_config().batch_size(BATCH));
        let keys = 8;
        let writing = {
            let (pool, dest) = (pool.clone(), dest.clone());
            tokio::spawn(async move { commit_rounds(&pool, &dest, keys, 150, Duration::from_millis(40)).await })
        };
        // Flowing first: some messages are on the broker.
        let before = fixture.read(&dest, 40, Duration::from_secs(60)).await;
        assert!(before.len() >= 40, "{name}: the relay did not publish before the cut");
        fixture.cut().await;
        let cut_at = store.status().await.unwrap().pending;
        // Writers keep committing while cut: the backlog grows.
        wait_for("the backlog to grow while cut", Duration::from_secs(60), || {
            let store = store.clone();
            async move { store.status().await.unwrap().pending >= cut_at + 40 }
        })
        .await;
        fixture.restore().await;
        let ids = writing.await.unwrap();
        drained(&store, Duration::from_secs(120)).await;
        relay.stop().await;
        assert!(store.dead_letters(10).await.unwrap().is_empty(), "{name}: dead letters");
        let expect: HashSet<Uuid> = ids.into_iter().collect();
        let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
        let dups = check_delivery(name, &seen, &expect);
        let bound = BATCH * keys;
        assert!(dups <= bound, "{name}: {dups} duplicates (bound {bound})");
        eprintln!(
            "{name}: key order through a cut: {} delivered, {dups} duplicates",
            expect.len()
        );
    }

    /// Writers commit while the server is SIGKILLed and started again on its storage: 0 lost, each
    /// key's seqs in order, duplicates within one batch per lane, nothing dead-lettered.
    pub async fn restart_mid_stream(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let publisher = fixture.publisher().await;
        let (pool, store) = outbox_db().await;
        let relay = start(store.clone(), publisher, test_config().batch_size(BATCH));
        let keys = 8;
        let writing = {
            let (pool, dest) = (pool.clone(), dest.clone());
            tokio::spawn(async move { commit_rounds(&pool, &dest, keys, 150, Duration::from_millis(40)).await })
        };
        let before = fixture.read(&dest, 40, Duration::from_secs(60)).await;
        assert!(before.len() >= 40, "{name}: the relay did not publish before the kill");
        fixture.kill().await;
        // Commits while the server is down, whether or not the paced writer is still going (on a
        // slow machine it can finish before the kill): none of them can be marked before the restart.
        let during = commit_rounds(&pool, &dest, keys, 10, Duration::from_millis(40)).await;
        let pending = store.status().await.unwrap().pending;
        assert!(
            pending >= during.len() as i64,
            "{name}: {pending} pending, but {} were committed while the server is down",
            during.len()
        );
        fixture.start().await;
        let mut ids = writing.await.unwrap();
        ids.extend(during);
        drained(&store, Duration::from_secs(180)).await;
        relay.stop().await;
        assert!(store.dead_letters(10).await.unwrap().is_empty(), "{name}: dead letters");
        let expect: HashSet<Uuid> = ids.into_iter().collect();
        let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(90)).await;
        let dups = check_delivery(name, &seen, &expect);
        let bound = BATCH * keys;
        assert!(dups <= bound, "{name}: {dups} duplicates (bound {bound})");
        eprintln!(
            "{name}: restart mid-stream: {} delivered, {dups} duplicates",
            expect.len()
        );
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

    /// A payload the broker refuses as too large is `Permanent` (dead-lettered, never retried),
    /// and the publisher goes on publishing.
    pub async fn oversize_is_permanent(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let publisher = fixture.publisher().await;
        let big = stored(1, &dest, Some("big"), Some(1), vec![b'x'; fixture.oversize()]);
        let out = tokio::time::timeout(Duration::from_secs(60), publisher.publish(&[big]))
            .await
            .expect("an oversize publish returns");
        match &out[0] {
            Err(e) if e.kind == FailureKind::Permanent => {}
            other => panic!("{name}: an oversize payload must be Permanent, was {other:?}"),
        }
        publish_until_ok(&*publisher, &dest, Duration::from_secs(30)).await;
    }

    /// Publishing to a destination the broker does not have is `Permanent`, within a bound.
    pub async fn missing_destination_is_permanent(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let missing = fixture.missing_destination().await;
        let publisher = fixture.publisher().await;
        let row = stored(1, &missing, Some("k"), Some(1), b"nowhere".to_vec());
        let started = Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(60), publisher.publish(&[row]))
            .await
            .expect("a publish to a missing destination returns");
        match &out[0] {
            Err(e) if e.kind == FailureKind::Permanent => {}
            other => panic!("{name}: a missing destination must be Permanent, was {other:?}"),
        }
        eprintln!("{name}: missing destination Permanent after {:.1?}", started.elapsed());
    }

    /// One batch, one message of it to a missing destination: only that one fails (`Permanent`);
    /// a later message of its key is delivered or held back; every other message is delivered.
    pub async fn mixed_batch(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let missing = fixture.missing_destination().await;
        let publisher = fixture.publisher().await;
        let batch = vec![
            stored(1, &dest, Some("a"), Some(1), b"a1".to_vec()),
            stored(2, &dest, Some("b"), Some(1), b"b1".to_vec()),
            stored(3, &missing, Some("c"), Some(1), b"c1".to_vec()),
            stored(4, &dest, Some("a"), Some(2), b"a2".to_vec()),
            stored(5, &dest, Some("c"), Some(2), b"c2".to_vec()),
            stored(6, &dest, None, None, b"unkeyed".to_vec()),
            stored(7, &dest, Some("b"), Some(2), b"b2".to_vec()),
        ];
        let out = tokio::time::timeout(Duration::from_secs(60), publisher.publish(&batch))
            .await
            .expect("the batch returns");
        assert_eq!(out.len(), batch.len(), "{name}: one outcome per message");
        let mut expect = HashSet::new();
        for (i, (row, r)) in batch.iter().zip(&out).enumerate() {
            match (i, r) {
                (2, Err(e)) if e.kind == FailureKind::Permanent => {}
                (2, other) => panic!("{name}: the message to a missing destination must be Permanent: {other:?}"),
                (4, Err(e)) if e.kind == FailureKind::HeldBack => {}
                (_, Ok(d)) => {
                    assert_eq!(d.pos, row.pos, "{name}: the outcome names its row");
                    expect.insert(row.id);
                }
                (_, other) => panic!("{name}: message {i} ({:?}) must be delivered: {other:?}", row.key),
            }
        }
        let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
        let ids: HashSet<Uuid> = seen.iter().map(|r| r.id).collect();
        assert_eq!(
            ids, expect,
            "{name}: exactly the delivered messages are on the destination"
        );
    }

    /// The same through the relay (dead letters skipped): the message to the missing destination is
    /// dead-lettered, every other message arrives, each key in order (its key's later message too).
    pub async fn mixed_batch_relay(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let missing = fixture.missing_destination().await;
        let publisher = fixture.publisher().await;
        let (pool, store) = outbox_db().await;
        let bad = Message::new(missing, "to nowhere").key("key-bad");
        let mut msgs = vec![Message::new(&dest, "first").key("key-bad")];
        msgs.push(bad.clone());
        for i in 0..20 {
            msgs.push(Message::new(&dest, format!("{i}")).key(format!("key-{}", i % 4)));
        }
        msgs.push(Message::new(&dest, "after").key("key-bad"));
        let mut tx = pool.begin().await.unwrap();
        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        let relay = start(
            store.clone(),
            publisher,
            test_config().dead_letter_policy(outbox_relay::DeadLetterPolicy::Skip),
        );
        drained(&store, Duration::from_secs(120)).await;
        relay.stop().await;
        let dead = store.dead_letters(10).await.unwrap();
        assert_eq!(
            dead.len(),
            1,
            "{name}: exactly the bad message is dead-lettered: {dead:?}"
        );
        assert_eq!(dead[0].id, bad.id());
        let expect: HashSet<Uuid> = msgs.iter().map(|m| m.id()).filter(|id| *id != bad.id()).collect();
        let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
        let ids: HashSet<Uuid> = seen.iter().map(|r| r.id).collect();
        assert_eq!(ids, expect, "{name}: every other message arrived");
        // key-bad: seq 1 then seq 3 (seq 2 was the dead letter).
        let bad_key: Vec<i64> = seen
            .iter()
            .filter(|r| r.key.as_deref() == Some("key-bad"))
            .filter_map(|r| r.seq)
            .collect();
        assert_eq!(bad_key.first(), Some(&1), "{name}: key-bad in order: {bad_key:?}");
        assert_eq!(
            bad_key.iter().find(|s| **s != 1),
            Some(&3),
            "{name}: key-bad in order: {bad_key:?}"
        );
        let good: Vec<Received> = seen
            .into_iter()
            .filter(|r| r.key.as_deref() != Some("key-bad"))
            .collect();
        let good_ids: HashSet<Uuid> = good.iter().map(|r| r.id).collect();
        check_delivery(name, &good, &good_ids);
    }

    /// Through the relay: id, key, seq, source, a `traceparent` and a user header arrive unchanged,
    /// payload bytes too (non-UTF-8 included); an unkeyed message carries no key and no seq.
    pub async fn headers_end_to_end(fixture: Arc<dyn BrokerFixture>) {
        let name = fixture.name();
        let dest = fixture.destination().await;
        let publisher = fixture.publisher().await;
        let (pool, store) = outbox_db().await;
        let source: String = sqlx::query_scalar("SELECT id FROM outbox_source")
            .fetch_one(&pool)
            .await
            .unwrap();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let payload: Vec<u8> = vec![0x00, 0xff, 0xfe, b'{', 0x80, 0xc3, 0x28, b'}', 0x00];
        let keyed = Message::new(&dest, payload.clone())
            .key("order-42")
            .header("traceparent", traceparent)
            .header("x-user", "caf\u{e9} \u{1f600}");
        let second = Message::new(&dest, "second").key("order-42");
        let unkeyed = Message::new(&dest, Vec::<u8>::new()).header("x-user", "plain");
        let mut tx = pool.begin().await.unwrap();
        for m in [&keyed, &second, &unkeyed] {
            outbox::enqueue(&mut tx, m).await.unwrap();
        }
        tx.commit().await.unwrap();
        let relay = start(store.clone(), publisher, test_config());
        drained(&store, Duration::from_secs(60)).await;
        relay.stop().await;
        let expect = HashSet::from([keyed.id(), second.id(), unkeyed.id()]);
        let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
        check_delivery(name, &seen, &expect);
        let find = |id: Uuid| seen.iter().find(|r| r.id == id).expect("read back").clone();
        let header = |r: &Received, h: &str| {
            r.headers
                .iter()
                .filter(|(n, _)| n == h)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };

        let r = find(keyed.id());
        assert_eq!(r.key.as_deref(), Some("order-42"), "{name}: key");
        assert_eq!(r.seq, Some(1), "{name}: seq");
        assert_eq!(r.source.as_deref(), Some(source.as_str()), "{name}: source");
        assert_eq!(r.payload, payload, "{name}: payload bytes");
        assert_eq!(header(&r, "traceparent"), [traceparent], "{name}: traceparent");
        assert_eq!(header(&r, "x-user"), ["caf\u{e9} \u{1f600}"], "{name}: user header");
        assert_eq!(
            header(&r, outbox::HEADER_ID),
            [keyed.id().to_string()],
            "{name}: id header"
        );
        assert_eq!(header(&r, outbox::HEADER_KEY), ["order-42"], "{name}: key header");
        assert_eq!(header(&r, outbox::HEADER_SEQ), ["1"], "{name}: seq header");
        assert_eq!(
            header(&r, outbox::HEADER_SOURCE),
            std::slice::from_ref(&source),
            "{name}: source header"
        );

        let r = find(second.id());
        assert_eq!((r.key.as_deref(), r.seq), (Some("order-42"), Some(2)), "{name}: second");
        assert_eq!(r.payload, b"second", "{name}: second payload");

        let r = find(unkeyed.id());
        assert_eq!(r.key, None, "{name}: an unkeyed message has no key");
        assert_eq!(r.seq, None, "{name}: an unkeyed message has no seq");
        assert_eq!(r.source.as_deref(), Some(source.as_str()), "{name}: source (unkeyed)");
        assert!(r.payload.is_empty(), "{name}: empty payload");
        assert_eq!(header(&r, "x-user"), ["plain"], "{name}: user header (unkeyed)");
    }
}
