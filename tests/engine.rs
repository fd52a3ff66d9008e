//! The engine with a scripted publisher over real PostgreSQL, where exact order and concurrency can
//! be checked. The broker-backed tests (relay.rs, faults.rs) run the same engine on Kafka.
//!
//! Claim ahead: the relay claims a lane's next batch while the current one is being published. A
//! key whose row failed must send nothing after it until the retry succeeded, and every row is
//! delivered. The publisher fails the chosen rows on their first attempts and records every call.
//!
//! Busy lanes: with `max_busy_lanes = n`, never more than n batches are being published at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox::{Delivered, Message, PublishError, Publisher, StoreAdmin, StoredMessage};
use outbox_relay::ClaimAhead;
use outbox_tests::embedded::{drained, start, test_config};

/// Fails a row `failures` times when its (key, seq) is in `flaky`, and then every later row of that
/// key in the same call (as an idempotent producer fails the rest of a partition's queue); delivers
/// everything else. Records what it was handed, call by call.
struct Scripted {
    flaky: HashMap<(String, i64), u32>,
    failed: Mutex<HashMap<(String, i64), u32>>,
    calls: Mutex<Vec<Vec<(String, i64, bool)>>>,
}

impl Scripted {
    fn new(flaky: impl IntoIterator<Item = (&'static str, i64, u32)>) -> Arc<Self> {
        Arc::new(Scripted {
            flaky: flaky.into_iter().map(|(k, s, n)| ((k.to_owned(), s), n)).collect(),
            failed: Mutex::default(),
            calls: Mutex::default(),
        })
    }
}

#[async_trait]
impl Publisher for Scripted {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        // A little broker latency, so the claim ahead really runs beside the publish.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut failing: HashSet<String> = HashSet::new();
        let mut call = Vec::new();
        let mut out = Vec::new();
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
                Err(PublishError::retryable("scripted: broker timed out"))
            } else {
                Ok(Delivered::new(row.pos).at(0, seq))
            });
        }
        self.calls.lock().unwrap().push(call);
        out
    }
}

/// Replays the calls: a row may be handed over only when every earlier row of its key was already
/// delivered, or is handed over before it in the same call. Returns the delivered (key, seq) set.
fn check_order(calls: &[Vec<(String, i64, bool)>]) -> HashSet<(String, i64)> {
    let mut delivered: HashMap<String, i64> = HashMap::new(); // key -> highest seq delivered in order
    let mut all = HashSet::new();
    for (n, call) in calls.iter().enumerate() {
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
        for (key, seq, ok) in call {
            if *ok && delivered.get(key).copied().unwrap_or(0) + 1 == *seq {
                delivered.insert(key.clone(), *seq);
            }
        }
    }
    all
}

async fn run(claim_ahead: ClaimAhead) {
    run_on(claim_ahead, &["t"]).await
}

/// [`run`] with the messages spread over `topics` (a key's seqs run across all of them).
async fn run_on(claim_ahead: ClaimAhead, topics: &[&str]) {
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
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

    let calls = publisher.calls.lock().unwrap().clone();
    let delivered = check_order(&calls);
    let expect: HashSet<(String, i64)> = keys
        .iter()
        .flat_map(|k| (1..=40).map(move |s| (k.to_string(), s)))
        .collect();
    assert_eq!(delivered, expect, "every row delivered");
    let failures: usize = calls.iter().flatten().filter(|(_, _, ok)| !ok).count();
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

#[test]
fn the_order_check_catches_a_row_sent_past_its_failed_predecessor() {
    let call = |rows: &[(&str, i64, bool)]| rows.iter().map(|(k, s, ok)| (k.to_string(), *s, *ok)).collect();
    // k1 failed, then k2 was sent in the next call: caught.
    let bad = vec![call(&[("k", 1, false)]), call(&[("k", 2, true)])];
    assert!(std::panic::catch_unwind(|| check_order(&bad)).is_err());
    // Resending k1 before k2 is fine.
    let good = vec![call(&[("k", 1, false)]), call(&[("k", 1, true), ("k", 2, true)])];
    assert_eq!(check_order(&good).len(), 2);
}

/// Counts publishes in progress and remembers the most at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    most: AtomicUsize,
    rows: AtomicUsize,
}

#[async_trait]
impl Publisher for Concurrency {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.rows.fetch_add(batch.len(), Ordering::SeqCst);
        batch.iter().map(|r| Ok(Delivered::new(r.pos).at(0, r.pos))).collect()
    }
}

async fn most_busy(max_busy_lanes: Option<usize>) -> usize {
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    // 2,000 rows over 200 keys: every lane has work for several batches.
    let mut tx = pool.begin().await.unwrap();
    let msgs: Vec<Message> = (0..2000)
        .map(|i| Message::new("t", format!("{i}")).key(format!("k{}", i % 200)))
        .collect();
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let publisher = Arc::new(Concurrency::default());
    let cfg = test_config().batch_size(10).max_busy_lanes(max_busy_lanes);
    let relay = start(store.clone(), publisher.clone(), cfg);
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;
    assert_eq!(publisher.rows.load(Ordering::SeqCst), 2000, "every row published once");
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
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let mut tx = pool.begin().await.unwrap();
    let msgs: Vec<Message> = (0..1500)
        .map(|i| Message::new("t", format!("{i}")).key(format!("k{}", i % 100)))
        .collect();
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let publisher = Arc::new(Concurrency::default());
    // 500/s with a burst of one second: 1,500 messages cannot all be out in under 2 s. (Only a
    // lower bound: a slow machine makes it slower, never faster.)
    let started = std::time::Instant::now();
    let relay = start(store.clone(), publisher.clone(), test_config().max_rate(Some(500)));
    drained(&store, Duration::from_secs(60)).await;
    let took = started.elapsed();
    relay.stop().await;
    assert_eq!(publisher.rows.load(Ordering::SeqCst), 1500);
    assert!(
        took >= Duration::from_millis(1900),
        "1,500 messages at 500/s took only {took:?}"
    );
}
