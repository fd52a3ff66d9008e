//! The engine with a scripted publisher over real PostgreSQL, where exact order and concurrency can
//! be checked. The broker-backed tests (relay.rs, faults.rs) run the same engine on Kafka.
//!
//! Claim ahead: the relay claims a lane's next batch while the current one is being published. A
//! key whose row failed must send nothing after it until the retry succeeded, and every row is
//! delivered. The publisher fails the chosen rows on their first attempts and records every call.
//!
//! Pipelined lanes: a lane publishes its next batch while earlier ones are in flight; a key is in
//! one of them at the most, checked against when each call answered.
//!
//! Busy lanes: with `max_busy_lanes = n`, never more than n batches are being published at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox::{Delivered, Message, PublishError, Publisher, StoreAdmin, StoredMessage};
use outbox_relay::{ClaimAhead, RelayConfig};
use outbox_tests::embedded::{drained, start, test_config, Concurrency};
use outbox_tests::wait::wait_for;

#[path = "engine/looks.rs"]
mod looks;
#[path = "engine/observed.rs"]
mod observed;
#[path = "engine/pace.rs"]
mod pace;

/// Fails a row `failures` times when its (key, seq) is in `flaky`, and then every later row of that
/// key in the same call (as an idempotent producer fails the rest of a partition's queue); delivers
/// everything else after `latency`. Records what it was handed and when each call ended, and the
/// most calls in flight at once for one lane.
struct Scripted {
    flaky: HashMap<(String, i64), u32>,
    /// How a flaky row fails (a retryable error unless said otherwise).
    error: fn(&'static str) -> PublishError,
    latency: Duration,
    failed: Mutex<HashMap<(String, i64), u32>>,
    events: Mutex<Vec<Event>>,
    lanes: Mutex<HashMap<i32, usize>>,
    most_per_lane: AtomicUsize,
}

/// A call handed its rows over (key, seq, delivered), or the call with that number answered.
#[derive(Debug, Clone)]
enum Event {
    Start(usize, Vec<(String, i64, bool)>),
    End(usize),
}

impl Scripted {
    fn new(flaky: impl IntoIterator<Item = (&'static str, i64, u32)>) -> Arc<Self> {
        Self::slow(flaky, Duration::from_millis(5))
    }

    fn slow(flaky: impl IntoIterator<Item = (&'static str, i64, u32)>, latency: Duration) -> Arc<Self> {
        Self::failing_with(flaky, latency, PublishError::retryable)
    }

    fn failing_with(
        flaky: impl IntoIterator<Item = (&'static str, i64, u32)>,
        latency: Duration,
        error: fn(&'static str) -> PublishError,
    ) -> Arc<Self> {
        Arc::new(Scripted {
            flaky: flaky.into_iter().map(|(k, s, n)| ((k.to_owned(), s), n)).collect(),
            error,
            latency,
            failed: Mutex::default(),
            events: Mutex::default(),
            lanes: Mutex::default(),
            most_per_lane: AtomicUsize::new(0),
        })
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

#[async_trait]
impl Publisher for Scripted {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let mut failing: HashSet<String> = HashSet::new();
        let mut call = Vec::new();
        let mut out = Vec::new();
        {
            let mut failed = self.failed.lock().unwrap();
            for row in batch {
                let key = row.key.clone().unwrap_or_default();
                let seq = row.seq.unwrap_or_default();
                let id = (key.clone(), seq);
                let mut fail = failing.contains(&key);
                if !fail {
                    if let Some(&n) = self.flaky.get(&id) {
                        let done = failed.entry(id).or_default();
                        if *done < n {
                            *done += 1;
                            fail = true;
                            failing.insert(key.clone());
                        }
                    }
                }
                call.push((key, seq, !fail));
                out.push(if fail {
                    Err((self.error)("scripted: broker timed out"))
                } else {
                    Ok(Delivered::new(row.pos).at(0, seq))
                });
            }
        }
        let lane = batch.first().map(|r| r.lane).unwrap_or_default();
        let n = {
            let mut events = self.events.lock().unwrap();
            let n = events.len();
            events.push(Event::Start(n, call));
            let mut lanes = self.lanes.lock().unwrap();
            let now = lanes.entry(lane).or_default();
            *now += 1;
            self.most_per_lane.fetch_max(*now, Ordering::SeqCst);
            n
        };
        // Broker latency, so that claims run beside the publish.
        tokio::time::sleep(self.latency).await;
        let mut events = self.events.lock().unwrap();
        *self.lanes.lock().unwrap().get_mut(&lane).unwrap() -= 1;
        events.push(Event::End(n));
        out
    }
}

/// Replays the calls: a row may be handed over only when every earlier row of its key was
/// delivered by a call that had answered before, or is handed over before it in the same call.
/// Returns the delivered (key, seq) set.
fn check_order(events: &[Event]) -> HashSet<(String, i64)> {
    let mut delivered: HashMap<String, i64> = HashMap::new(); // key -> highest seq delivered in order
    let mut calls: HashMap<usize, &[(String, i64, bool)]> = HashMap::new();
    let mut all = HashSet::new();
    for event in events {
        match event {
            Event::Start(n, call) => {
                let mut expected: HashMap<&str, i64> = HashMap::new();
                for (key, seq, ok) in call {
                    let next = expected
                        .entry(key.as_str())
                        .or_insert_with(|| delivered.get(key).copied().unwrap_or(0) + 1);
                    assert!(
                        *seq <= *next,
                        "call {n}: key {key} seq {seq} handed over before seq {next} was delivered"
                    );
                    if *seq == *next {
                        *next += 1;
                    }
                    if *ok {
                        all.insert((key.clone(), *seq));
                    }
                }
                calls.insert(*n, call);
            }
            Event::End(n) => {
                for (key, seq, ok) in calls[n] {
                    if *ok && delivered.get(key).copied().unwrap_or(0) + 1 == *seq {
                        delivered.insert(key.clone(), *seq);
                    }
                }
            }
        }
    }
    all
}

/// How many rows the publisher failed, all calls together.
fn failures(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| match e {
            Event::Start(_, call) => call.iter().filter(|(_, _, ok)| !ok).count(),
            Event::End(_) => 0,
        })
        .sum()
}

fn every(keys: &[String], rows_per_key: i64) -> HashSet<(String, i64)> {
    keys.iter()
        .flat_map(|k| (1..=rows_per_key).map(move |s| (k.clone(), s)))
        .collect()
}

async fn run(claim_ahead: ClaimAhead) {
    run_on(claim_ahead, &["t"]).await
}

/// [`run`] with the messages spread over `topics` (a key's seqs run across all of them).
async fn run_on(claim_ahead: ClaimAhead, topics: &[&str]) {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    // Keys "a".."e" share lanes with many others; 40 rows each, committed in 8 transactions.
    let keys = ["a", "b", "c", "d", "e"];
    let mut tx = pool.begin().await.unwrap();
    for i in 0..200 {
        let topic = topics[(i / keys.len()) % topics.len()];
        outbox::enqueue(&mut tx, &Message::new(topic, format!("{i}")).key(keys[i % keys.len()]))
            .await
            .unwrap();
        if i % 25 == 24 {
            tx.commit().await.unwrap();
            tx = pool.begin().await.unwrap();
        }
    }
    tx.commit().await.unwrap();

    // Failures early in a batch, so the batch claimed ahead holds later rows of the same key.
    let publisher = Scripted::new([("a", 2, 1), ("b", 7, 3), ("c", 1, 2), ("d", 20, 1), ("e", 40, 2)]);
    let cfg = test_config()
        .batch_size(8)
        .backoff_base(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(100))
        .claim_ahead(claim_ahead);
    let relay = start(store.clone(), publisher.clone(), cfg);
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let events = publisher.events();
    let delivered = check_order(&events);
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_eq!(delivered, every(&keys, 40), "every row delivered");
    let failures = failures(&events);
    assert!(failures >= 9, "the scripted failures happened ({failures})");
    assert!(store.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_ahead_never_hands_over_a_row_before_its_failed_predecessor() {
    run(ClaimAhead::Always).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_on_two_topics_sends_nothing_past_its_failed_message_on_either() {
    run_on(ClaimAhead::Never, &["orders", "invoices"]).await;
    run_on(ClaimAhead::Always, &["orders", "invoices"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_ahead_auto_keeps_the_same_order() {
    run(ClaimAhead::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claiming_after_the_marks_keeps_the_same_order() {
    run(ClaimAhead::Never).await;
}

/// Rows trickle in one per transaction while the relay runs: lanes get short batches and publish
/// the next while the last is in flight. Every hand-over keeps key order through the scripted
/// failures, and batches of one lane did overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_batches_never_hand_over_a_row_before_its_predecessor() {
    pipelined_in_order(test_config()).await;
}

/// The same with lanes that never linger: a lane with a batch in flight is woken by the NOTIFY of
/// each commit to it and publishes beside that batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_batches_woken_by_notify_never_hand_over_a_row_before_its_predecessor() {
    pipelined_in_order(test_config().linger(Duration::ZERO)).await;
}

async fn pipelined_in_order(cfg: RelayConfig) {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let keys: Vec<String> = (0..40).map(|k| format!("k{k}")).collect();
    let publisher = Scripted::slow(
        [("k1", 2, 1), ("k7", 5, 2), ("k20", 1, 1), ("k33", 9, 3), ("k38", 4, 1)],
        Duration::from_millis(40),
    );
    let cfg = cfg
        .batch_size(8)
        .pipeline(4)
        .backoff_base(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(100));
    let relay = start(store.clone(), publisher.clone(), cfg);
    for i in 0..400 {
        let msg = Message::new("t", format!("{i}")).key(keys[i % keys.len()].as_str());
        outbox_tests::db::commit_each(&pool, [msg]).await;
    }
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let events = publisher.events();
    assert_eq!(check_order(&events), every(&keys, 10), "every row delivered");
    assert!(failures(&events) >= 8, "the scripted failures happened");
    let most = publisher.most_per_lane.load(Ordering::SeqCst);
    assert!(most >= 2, "batches of one lane never overlapped ({most} at once)");
    assert!(store.dead_letters(10).await.unwrap().is_empty());
}

/// The key of the lane the NOTIFY tests watch.
const FIRST: &str = "first";

/// A relay publishing with `publisher` and `cfg`, its lanes not lingering (each asks for NOTIFY once dry) and
/// up to four batches in flight, once the lane of [`FIRST`] has published a first row (so it knows
/// its publishes take longer than its claims) and every lane asks for NOTIFY again; with the pool,
/// the store and another key of that lane.
async fn lane_woken_by_notify<P: Publisher + 'static>(
    publisher: &Arc<P>,
    cfg: RelayConfig,
) -> (
    sqlx::PgPool,
    outbox::postgres::PgStore,
    outbox_tests::embedded::Running,
    String,
) {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let lane_of = |key: &str| outbox::lane_of(Some(key), uuid::Uuid::nil(), outbox::LANES);
    let second = (0..)
        .map(|i| format!("second-{i}"))
        .find(|k| lane_of(k) == lane_of(FIRST))
        .unwrap();
    let relay = start(store.clone(), publisher.clone(), cfg.pipeline(4).linger(Duration::ZERO));
    let idle = "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL AND idle";
    let all_idle = || async { outbox_tests::db::scalar::<_, i64>(&pool, idle).await == i64::from(outbox::LANES) };
    wait_for("every lane to ask for NOTIFY", Duration::from_secs(10), all_idle).await;
    outbox_tests::db::commit_each(&pool, [Message::new("t", "1").key(FIRST)]).await;
    drained(&store, Duration::from_secs(10)).await;
    wait_for("the lane to ask for NOTIFY again", Duration::from_secs(10), all_idle).await;
    (pool, store, relay, second)
}

/// Whether an event hands over row `seq` of `key`.
fn started(key: &str, seq: i64) -> impl Fn(&Event) -> bool {
    let key = key.to_owned();
    move |e: &Event| matches!(e, Event::Start(_, rows) if rows.iter().any(|(k, s, _)| *k == key && *s == seq))
}

/// A lane that does not linger asks for NOTIFY as soon as it runs dry. A row committed to it while
/// its batch is in flight is published at once, beside that batch, not after it: the NOTIFY of its
/// commit wakes the lane, which has room for another batch (its claims are quicker than its
/// publishes, known from a first batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_woken_by_notify_publishes_a_new_row_beside_the_batch_in_flight() {
    let publisher = Scripted::slow([], Duration::from_millis(1000));
    let (pool, store, relay, second) = lane_woken_by_notify(&publisher, test_config()).await;
    outbox_tests::db::commit_each(&pool, [Message::new("t", "2").key(FIRST)]).await;
    wait_for(
        "the second row of the lane to be published",
        Duration::from_secs(10),
        || async { publisher.events().iter().any(started(FIRST, 2)) },
    )
    .await;
    outbox_tests::db::commit_each(&pool, [Message::new("t", "3").key(second.as_str())]).await;
    drained(&store, Duration::from_secs(10)).await;
    relay.stop().await;

    let events = publisher.events();
    let Some(Event::Start(call, _)) = events.iter().find(|e| started(FIRST, 2)(e)) else {
        unreachable!()
    };
    let answered = events
        .iter()
        .position(|e| matches!(e, Event::End(n) if n == call))
        .unwrap();
    let third = events
        .iter()
        .position(started(&second, 1))
        .expect("the third row was published");
    assert!(
        third < answered,
        "the row committed while its lane's batch was in flight waited for that batch: {events:?}"
    );
}

/// Asked to stop, a lane settles every batch in flight before it gives the lane up, so the next
/// owner does not send again what the broker confirmed (and a copy still on its way cannot land
/// after the key's later rows). A lane whose oldest batch came back with the broker unavailable
/// backed off, found itself stopped and left at once: the batch beside it was delivered and its
/// row stayed pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_stopped_while_its_oldest_batch_finds_the_broker_unavailable_still_marks_the_next() {
    let publisher = Scripted::failing_with([(FIRST, 2, 1)], Duration::from_millis(1000), |m| {
        PublishError::unavailable(m)
    });
    let (pool, _, relay, second) = lane_woken_by_notify(&publisher, test_config()).await;
    outbox_tests::db::commit_each(&pool, [Message::new("t", "2").key(FIRST)]).await;
    wait_for("the lane's batch to be published", Duration::from_secs(10), || async {
        publisher.events().iter().any(started(FIRST, 2))
    })
    .await;
    outbox_tests::db::commit_each(&pool, [Message::new("t", "3").key(second.as_str())]).await;
    wait_for("a second batch beside it", Duration::from_secs(10), || async {
        publisher.events().iter().any(started(&second, 1))
    })
    .await;
    relay.stop().await;

    let events = publisher.events();
    let Some(Event::Start(call, rows)) = events.iter().find(|e| started(&second, 1)(e)) else {
        unreachable!()
    };
    assert!(rows.iter().all(|(_, _, delivered)| *delivered), "{events:?}");
    assert!(
        events.iter().any(|e| matches!(e, Event::End(n) if n == call)),
        "the relay stopped before the broker answered the second batch: {events:?}"
    );
    let pending: Vec<(String, i64)> = sqlx::query_as("SELECT key, seq FROM outbox_messages ORDER BY key")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        pending,
        vec![(FIRST.to_owned(), 2)],
        "only the row the broker did not take stays pending: {events:?}"
    );
}

/// Answers its first call one result short, and answers every row of later calls; records each
/// row it was handed (by seq of key "k").
#[derive(Default)]
struct ShortOnce {
    calls: AtomicUsize,
    handed: Mutex<Vec<i64>>,
}

#[async_trait]
impl Publisher for ShortOnce {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        self.handed.lock().unwrap().extend(batch.iter().filter_map(|r| r.seq));
        let mut out: Vec<_> = batch.iter().map(|r| Ok(Delivered::new(r.pos))).collect();
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            out.pop();
        }
        out
    }
}

/// A publisher that answered fewer results than rows panicked the lane (an assertion): the lane's
/// task died with the batch unmarked, and the batch was sent again whole by the lane's next run,
/// the rows the broker had confirmed included. A row without an answer is now a retryable failure
/// of that row alone, and the answered ones are marked.
#[tokio::test]
async fn a_publisher_answering_fewer_results_than_rows_fails_only_the_unanswered_row() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let mut tx = pool.begin().await.unwrap();
    for i in 0..4 {
        outbox::enqueue(&mut tx, &Message::new("t", format!("{i}")).key("k"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let publisher = Arc::new(ShortOnce::default());
    let relay = start(store.clone(), publisher.clone(), test_config().batch_size(4));
    drained(&store, Duration::from_secs(30)).await;
    relay.stop().await;
    let handed = publisher.handed.lock().unwrap().clone();
    assert_eq!(handed, [1, 2, 3, 4, 4], "only the unanswered row is handed over again");
}

/// A lane whose idle flag could not be written (the database refused it once) went on as if it
/// were idle while the flag said busy: writers sent no wake-up, and every row of the lane waited
/// for the poll, for as long as the lane was held. It now tries again shortly, and a row committed
/// after the database takes the flag again wakes the lane at once.
#[tokio::test]
async fn a_lane_whose_idle_flag_was_refused_asks_again_and_is_woken_by_the_next_commit() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    // The first 64 times a lane's flag goes idle, it is refused (a sequence counts them: it is not
    // rolled back with the refused update). Every lane asks at least once.
    outbox_tests::db::exec(
        &pool,
        "CREATE SEQUENCE idle_asked; \
         CREATE FUNCTION refuse_idle() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.idle AND NOT OLD.idle AND nextval('idle_asked') <= 64 THEN \
             RAISE EXCEPTION 'idle flag refused'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_idle BEFORE UPDATE ON outbox_leases FOR EACH ROW EXECUTE FUNCTION refuse_idle()",
    )
    .await;
    let cfg = test_config().poll_interval(Duration::from_secs(60));
    let relay = start(store.clone(), Scripted::new([]), cfg);
    let idle = "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL AND idle";
    wait_for(
        "every lane's flag idle after 64 refusals",
        Duration::from_secs(30),
        || async {
            let asked: i64 = outbox_tests::db::scalar(&pool, "SELECT last_value FROM idle_asked").await;
            asked > 64 && outbox_tests::db::scalar::<_, i64>(&pool, idle).await == i64::from(outbox::LANES)
        },
    )
    .await;
    outbox_tests::db::commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    drained(&store, Duration::from_secs(10)).await;
    relay.stop().await;
}

/// Holds every question about the live relays for 2.5 s (a pool the service keeps busy, a lock
/// wait on the heartbeats).
struct SlowFairShare;

#[async_trait]
impl outbox::observed::Observer for SlowFairShare {
    async fn before(&self, call: outbox::observed::StoreCall) {
        if call == outbox::observed::StoreCall::LiveOwners {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
    }
}

/// The relay renewed its leases a third of the lease after the end of its last round, not of the
/// last renewal: a round whose later questions (the live relays, acquisitions) took long let every
/// lease expire before the next renewal, and other relays could take the lanes (sending again
/// what was in flight). Renewals are now a third of the lease apart, whatever the rest takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_renewed_in_time_when_the_rest_of_a_round_is_slow() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(outbox::observed::Observed::new(pg, SlowFairShare));
    let cfg = test_config().lease_ttl(Duration::from_secs(3));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    let held = "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL";
    wait_for("every lane held", Duration::from_secs(15), || async {
        outbox_tests::db::scalar::<_, i64>(&pool, held).await == i64::from(outbox::LANES)
    })
    .await;
    let expired = "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL AND expires_at < now()";
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        let n: i64 = outbox_tests::db::scalar(&pool, expired).await;
        assert_eq!(n, 0, "leases expired while their relay ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
}

/// Lets the first lease renewal through and holds every later one for ever (a connection cut
/// without a reset, a server that stopped answering).
struct RenewalsHang(AtomicUsize);

#[async_trait]
impl outbox::observed::Observer for RenewalsHang {
    async fn before(&self, call: outbox::observed::StoreCall) {
        if call == outbox::observed::StoreCall::Renew && self.0.fetch_add(1, Ordering::SeqCst) >= 1 {
            std::future::pending::<()>().await;
        }
    }
}

/// The relay renewed its leases before it looked at its shutdown signal again: with a renewal
/// that never answered, a stop (SIGTERM) waited for ever, past `shutdown_grace`. The signal now
/// ends the wait for the renewal.
#[tokio::test]
async fn a_relay_whose_lease_renewal_hangs_still_stops_when_told() {
    let (_pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(outbox::observed::Observed::new(pg, RenewalsHang(AtomicUsize::new(0))));
    let cfg = test_config().shutdown_grace(Duration::from_secs(1));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    wait_for("a renewal held", Duration::from_secs(20), || async {
        store.observer().0.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), relay.stop())
        .await
        .expect("the relay stops within 10 s of being told");
}

/// Publishes through a [`Scripted`]; a batch that holds `slow`'s key answers five seconds after
/// it, and `slow_answered` says when it has.
struct SlowerFor {
    slow: String,
    inner: Arc<Scripted>,
    slow_answered: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Publisher for SlowerFor {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let out = self.inner.publish(batch).await;
        if batch.iter().any(|r| r.key.as_deref() == Some(self.slow.as_str())) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.slow_answered.store(true, Ordering::SeqCst);
        }
        out
    }
}

/// A lane asked to stop settles its batches in flight; when one of their marks kept failing, it
/// gave that mark up after a few tries and returned at once, leaving the batches after it on their
/// way to the broker: the lease was released and the next owner could send those rows again while
/// the first copy was still on its way (and land after the key's later rows). It now settles every
/// batch in flight, waiting for the broker's answer to each, before it gives the lane up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_stopped_while_marks_fail_still_waits_for_every_batch_in_flight() {
    let scripted = Scripted::slow([], Duration::from_millis(1000));
    let lane_of = |key: &str| outbox::lane_of(Some(key), uuid::Uuid::nil(), outbox::LANES);
    // Three keys of the lane: the setup's first and second, and a third whose batches are slow.
    let mut keys = (0..)
        .map(|i| format!("second-{i}"))
        .filter(|k| lane_of(k) == lane_of(FIRST));
    let (_, third) = (keys.next().unwrap(), keys.next().unwrap());
    let publisher = Arc::new(SlowerFor {
        slow: third.clone(),
        inner: Arc::clone(&scripted),
        slow_answered: Default::default(),
    });
    let (pool, _, relay, second) = lane_woken_by_notify(&publisher, test_config()).await;
    // The first key's and the second key's next rows cannot be marked.
    let refuse = format!(
        "CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'mark refused'; END $$; \
         CREATE TRIGGER refuse_mark BEFORE DELETE ON outbox_messages FOR EACH ROW \
           WHEN ((OLD.key = 'first' AND OLD.seq = 2) OR OLD.key = '{second}') EXECUTE FUNCTION refuse_mark()"
    );
    outbox_tests::db::exec(&pool, &refuse).await;
    for (i, key) in [FIRST, second.as_str(), third.as_str()].into_iter().enumerate() {
        outbox_tests::db::commit_each(&pool, [Message::new("t", format!("{i}")).key(key)]).await;
        wait_for("the batch to be handed over", Duration::from_secs(10), || async {
            scripted
                .events()
                .iter()
                .any(started(key, if key == FIRST { 2 } else { 1 }))
        })
        .await;
    }
    // Three batches in flight: the lane stops; the marks of the first two are refused.
    relay.stop().await;
    assert!(
        publisher.slow_answered.load(Ordering::SeqCst),
        "the lane was given up with the third key's batch still on its way: {:?}",
        scripted.events()
    );
}

/// Hands a call over to `inner` once another call with a row of `keys` has come too: two such
/// calls must be under way at the same time, or neither answers.
struct Together {
    keys: Vec<String>,
    met: tokio::sync::Barrier,
    inner: Arc<Scripted>,
}

#[async_trait]
impl Publisher for Together {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        if batch
            .iter()
            .any(|r| r.key.as_ref().is_some_and(|k| self.keys.contains(k)))
        {
            self.met.wait().await;
        }
        self.inner.publish(batch).await
    }
}

/// Under `max_busy_lanes`, a lane whose oldest batch's marks keep failing gives up its turns while
/// it retries them. It gave up that batch's only: the batch in flight after it (answered, waiting
/// for the marks before it) kept its own, and with two turns two other lanes could not work side
/// by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_whose_marks_keep_failing_gives_up_the_turns_of_every_batch_in_flight() {
    let scripted = Scripted::slow([], Duration::from_millis(1000));
    let lane_of = |key: &str| outbox::lane_of(Some(key), uuid::Uuid::nil(), outbox::LANES);
    let others: Vec<String> = (0..)
        .map(|i| format!("other-{i}"))
        .filter(|k| lane_of(k) != lane_of(FIRST))
        .scan(HashSet::new(), |lanes, k| Some(lanes.insert(lane_of(&k)).then_some(k)))
        .flatten()
        .take(2)
        .collect();
    let publisher = Arc::new(Together {
        keys: others.clone(),
        met: tokio::sync::Barrier::new(2),
        inner: Arc::clone(&scripted),
    });
    let cfg = test_config().max_busy_lanes(Some(2));
    let (pool, _, relay, second) = lane_woken_by_notify(&publisher, cfg).await;
    outbox_tests::db::exec(
        &pool,
        "CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'mark refused'; END $$; \
         CREATE TRIGGER refuse_mark BEFORE DELETE ON outbox_messages FOR EACH ROW \
           WHEN (OLD.key = 'first' AND OLD.seq = 2) EXECUTE FUNCTION refuse_mark()",
    )
    .await;
    // Two batches of the lane in flight, one turn each; the first one's marks are refused.
    for (key, seq) in [(FIRST, 2), (second.as_str(), 1)] {
        outbox_tests::db::commit_each(&pool, [Message::new("t", "x").key(key)]).await;
        wait_for("the batch to be handed over", Duration::from_secs(10), || async {
            scripted.events().iter().any(started(key, seq))
        })
        .await;
    }
    for key in &others {
        outbox_tests::db::commit_each(&pool, [Message::new("t", "x").key(key.as_str())]).await;
    }
    wait_for(
        "two other lanes to publish side by side while the marks fail",
        Duration::from_secs(30),
        || async { others.iter().all(|k| scripted.events().iter().any(started(k, 1))) },
    )
    .await;
    relay.stop().await;
}

/// Answers after 3 s, and notes whether it got that far.
#[derive(Default)]
struct Unhurried {
    started: std::sync::atomic::AtomicBool,
    finished: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Publisher for Unhurried {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        self.started.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.finished.store(true, Ordering::SeqCst);
        batch.iter().map(|r| Ok(Delivered::new(r.pos))).collect()
    }
}

/// A lane aborted at `shutdown_grace` left its batch's publish task running: a publisher that
/// sends a key's messages one after another went on sending after the relay had stopped (and, in
/// a service that runs on, after the next owner sent the key's later messages). The task is now
/// stopped with its lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_still_publishing_at_the_end_of_the_grace_is_stopped_with_its_lane() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let publisher = Arc::new(Unhurried::default());
    let cfg = test_config().shutdown_grace(Duration::from_millis(300));
    let relay = start(store.clone(), Arc::clone(&publisher), cfg);
    outbox_tests::db::commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    wait_for("the publish to start", Duration::from_secs(10), || async {
        publisher.started.load(Ordering::SeqCst)
    })
    .await;
    relay.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !publisher.finished.load(Ordering::SeqCst),
        "the publish went on after its relay stopped"
    );
}

#[test]
fn the_order_check_catches_a_row_sent_past_its_failed_predecessor() {
    let rows = |r: &[(&str, i64, bool)]| r.iter().map(|(k, s, ok)| (k.to_string(), *s, *ok)).collect();
    let call = |n: usize, r: &[(&str, i64, bool)]| [Event::Start(n, rows(r)), Event::End(n)];
    // k1 failed, then k2 was sent in the next call: caught.
    let bad = [call(0, &[("k", 1, false)]), call(1, &[("k", 2, true)])].concat();
    assert!(std::panic::catch_unwind(|| check_order(&bad)).is_err());
    // k2 handed over while the call with k1 had not answered yet: caught.
    let early = [
        Event::Start(0, rows(&[("k", 1, true)])),
        Event::Start(1, rows(&[("k", 2, true)])),
        Event::End(0),
        Event::End(1),
    ];
    assert!(std::panic::catch_unwind(|| check_order(&early)).is_err());
    // Resending k1 before k2 is fine.
    let good = [call(0, &[("k", 1, false)]), call(1, &[("k", 1, true), ("k", 2, true)])].concat();
    assert_eq!(check_order(&good).len(), 2);
}

/// Commits `rows` rows over `keys` keys to a fresh outbox, runs a relay with `cfg` on them until
/// drained, publishing to a [`Concurrency`], and checks every row was published once. Returns the
/// publisher and how long the relay took to drain.
async fn drain_backlog(rows: usize, keys: usize, cfg: RelayConfig) -> (Arc<Concurrency>, Duration) {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let msgs: Vec<Message> = (0..rows)
        .map(|i| Message::new("t", format!("{i}")).key(format!("k{}", i % keys)))
        .collect();
    outbox_tests::db::commit_batch(&pool, &msgs).await;
    let publisher = Arc::new(Concurrency::default());
    let started = std::time::Instant::now();
    let relay = start(store.clone(), publisher.clone(), cfg);
    drained(&store, Duration::from_secs(60)).await;
    let took = started.elapsed();
    relay.stop().await;
    assert_eq!(publisher.rows.load(Ordering::SeqCst), rows, "every row published once");
    (publisher, took)
}

async fn most_busy(max_busy_lanes: Option<usize>) -> usize {
    // 2,000 rows over 200 keys: every lane has work for several batches.
    let cfg = test_config().batch_size(10).max_busy_lanes(max_busy_lanes);
    let (publisher, _) = drain_backlog(2000, 200, cfg).await;
    publisher.most.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_busy_lanes_caps_the_batches_in_flight() {
    let most = most_busy(Some(3)).await;
    assert!(
        (1..=3).contains(&most),
        "{most} batches in flight with max_busy_lanes = 3"
    );
    // Without the cap the lanes overlap (the check above is not vacuous).
    let most = most_busy(None).await;
    assert!(most > 3, "only {most} batches in flight without a cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_rate_paces_the_relay() {
    // 500/s with a burst of one second: 1,500 messages cannot all be out in under 2 s. (Only a
    // lower bound: a slow machine makes it slower, never faster.)
    let (_, took) = drain_backlog(1500, 100, test_config().max_rate(Some(500))).await;
    assert!(
        took >= Duration::from_millis(1900),
        "1,500 messages at 500/s took only {took:?}"
    );
}

/// A lane whose mark keeps failing (here a trigger refuses to delete its rows; in life a lock held
/// for longer than the lock timeout, a read-only standby) retries it for as long as it fails, but
/// gives up its turn meanwhile: it held the only one under `max_busy_lanes = 1` (or the adaptive
/// pace at one lane), and every other lane's backlog waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_whose_marks_keep_failing_leaves_its_turn_to_the_other_lanes() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let stuck = "stuck";
    let lane_of = |key: &str| outbox::lane_of(Some(key), uuid::Uuid::nil(), outbox::LANES);
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'deletes refused on this lane'; END $$; \
         CREATE TRIGGER refuse_delete BEFORE DELETE ON outbox_messages \
         FOR EACH ROW WHEN (OLD.lane = {}) EXECUTE FUNCTION refuse_delete();",
        lane_of(stuck)
    ))
    .execute(&pool)
    .await
    .unwrap();
    // More than a batch: the lane is catching up, so it needs a turn for every batch.
    outbox_tests::db::commit_each(&pool, (0..10).map(|i| Message::new("t", format!("{i}")).key(stuck))).await;
    let publisher = Scripted::new([]);
    let cfg = test_config().batch_size(5).max_busy_lanes(Some(1));
    let relay = start(store.clone(), publisher.clone(), cfg);
    wait_for(
        "the stuck lane's first batch to be published",
        Duration::from_secs(10),
        || async {
            publisher
                .events()
                .iter()
                .any(|e| matches!(e, Event::Start(_, rows) if rows.iter().any(|(k, ..)| k == stuck)))
        },
    )
    .await;
    let others: Vec<String> = (0..)
        .map(|i| format!("other-{i}"))
        .filter(|k| lane_of(k) != lane_of(stuck))
        .take(50)
        .collect();
    outbox_tests::db::commit_each(
        &pool,
        (0..100).map(|i| Message::new("t", format!("{i}")).key(others[i % 50].as_str())),
    )
    .await;
    let pending = "SELECT count(*) FROM outbox_messages";
    wait_for(
        "every other lane's rows to drain beside the stuck lane",
        Duration::from_secs(30),
        || async { outbox_tests::db::scalar::<_, i64>(&pool, pending).await == 10 },
    )
    .await;
    relay.stop().await;
}
