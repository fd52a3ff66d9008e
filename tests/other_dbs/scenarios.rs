//! What the databases' scenarios use: the application's own migrations, publishing claimed rows,
//! and the scenarios written once for both (a batch larger than one statement, writers beside a
//! relay).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outbox::{Delivered, Lease, Message, Store};
use outbox_tests::conformance::{claim_all, take_all, OWNER};

/// Publishes `rows` under `leases` (each row with its lane's lease), partition 0, offset = seq.
pub(crate) async fn publish(store: &dyn Store, leases: &[Lease], rows: &[outbox::StoredMessage]) {
    for l in leases {
        let done: Vec<Delivered> = rows
            .iter()
            .filter(|r| r.lane == l.lane)
            .map(|r| Delivered::new(r.pos).at(3, r.seq.unwrap_or(0)))
            .collect();
        store.mark_published(l, &done).await.unwrap();
    }
}

/// 2,500 messages in one batch (more than one statement's worth of rows) over 7 keys and unkeyed
/// ones: every key gets a dense run of seqs in slice order, and claims return them in that order.
pub(crate) async fn big_batch<DB: outbox::Backend>(pool: &sqlx::Pool<DB>, store: &dyn Store) {
    let msgs: Vec<Message> = (0..2500)
        .map(|i| {
            let m = Message::new("t", format!("{i}"));
            if i % 10 == 9 {
                m
            } else {
                m.key(format!("key-{}", i % 7))
            }
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    // One message first, so the batch continues an existing counter.
    outbox::enqueue(&mut tx, &Message::new("t", "first").key("key-0"))
        .await
        .unwrap();
    let out = outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let mut next: HashMap<&str, i64> = HashMap::new();
    next.insert("key-0", 2);
    for (m, e) in msgs.iter().zip(&out) {
        assert_eq!(m.id(), e.id);
        match m.key_str() {
            None => assert_eq!(e.seq, None),
            Some(k) => {
                let want = next.entry(k).or_insert(1);
                assert_eq!(e.seq, Some(*want), "key {k}");
                *want += 1;
            }
        }
    }
    let leases = take_all(store, OWNER).await;
    let rows = claim_all(store, &leases).await;
    assert_eq!(rows.len(), 2501);
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        if let (Some(k), Some(s)) = (&r.key, r.seq) {
            let prev = last.insert(k.clone(), s).unwrap_or(0);
            assert_eq!(s, prev + 1, "key {k} claimed in seq order");
        }
    }
}

/// Writers enqueue into a few hot keys concurrently while a relay claims and publishes: every claim
/// continues each key exactly where the previous one stopped (no gap, no reordering), and in the
/// end every message was claimed once.
pub(crate) async fn writers_and_a_relay<DB: outbox::Backend>(pool: sqlx::Pool<DB>, store: Arc<dyn Store>) {
    let leases = take_all(&*store, OWNER).await;
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in 0..25u64 {
                    let mut tx = pool.begin().await.unwrap();
                    // Keys in a fixed order within a transaction, as any two writers of the same
                    // keys must (else they can deadlock on the counters, on every database).
                    let mut keys: Vec<u64> = (0..1 + (w + i) % 3).map(|j| (w * 7 + i * 3 + j) % 5).collect();
                    keys.sort();
                    let msgs: Vec<Message> = keys
                        .iter()
                        .map(|k| Message::new("t", format!("{w}-{i}-{k}")).key(format!("hot-{k}")))
                        .collect();
                    if i % 2 == 0 {
                        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                    } else {
                        for m in &msgs {
                            outbox::enqueue(&mut tx, m).await.unwrap();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis((w + i) % 3)).await;
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    let expected: usize = (0..8u64)
        .map(|w| (0..25u64).map(|i| (1 + (w + i) % 3) as usize).sum::<usize>())
        .sum();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = 0;
    let started = std::time::Instant::now();
    while seen < expected {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {seen} of {expected} claimed"
        );
        let rows = claim_all(&*store, &leases).await;
        for r in &rows {
            let (k, s) = (r.key.clone().unwrap(), r.seq.unwrap());
            let prev = last.insert(k.clone(), s).unwrap_or(0);
            assert_eq!(s, prev + 1, "key {k}: claimed seq {s} after {prev}");
        }
        seen += rows.len();
        publish(&*store, &leases, &rows).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(claim_all(&*store, &leases).await.is_empty());
    assert_eq!(last.values().sum::<i64>() as usize, expected);
}
