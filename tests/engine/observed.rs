//! `outbox::observed::Observed`: every call reaches the inner store unchanged, its observer sees it
//! before and after, with its rows, and may hold it back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox::observed::{Observed, Observer, StoreCall};
use outbox::{Delivered, Message, Store, StoreAdmin};
use outbox_tests::db::commit_each;
use tokio::sync::Semaphore;

/// Records every call it sees after it ended; holds claims back while `gate` has no permit.
struct Recorder {
    seen: Mutex<Vec<(StoreCall, usize, bool)>>,
    gate: Semaphore,
}

#[async_trait]
impl Observer for Recorder {
    async fn before(&self, call: StoreCall) {
        if call == StoreCall::Claim {
            self.gate.acquire().await.expect("never closed").forget();
        }
    }

    fn after(&self, call: StoreCall, rows: usize, _: Duration, ok: bool) {
        self.seen.lock().unwrap().push((call, rows, ok));
    }
}

#[tokio::test]
async fn an_observed_store_hands_every_call_on_and_its_observer_sees_rows_and_holds_calls_back() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let store = Arc::new(Observed::new(
        pg,
        Recorder {
            seen: Mutex::default(),
            gate: Semaphore::new(0),
        },
    ));
    assert!(store.wakeups().is_some(), "the inner store's wake-up is kept");
    commit_each(&pool, (0..3).map(|i| Message::new("t", format!("m{i}")).key("k"))).await;
    let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
    let lane = outbox::lane_of(Some("k"), uuid::Uuid::nil(), outbox::LANES);
    let lease = leases
        .iter()
        .find(|l| l.lane == lane)
        .expect("every lane acquired")
        .clone();

    let claim = {
        let (store, lease) = (Arc::clone(&store), lease.clone());
        tokio::spawn(async move { store.claim(&lease, 10, &[]).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!claim.is_finished(), "the observer holds the claim back");
    store.observer().gate.add_permits(1);
    let rows = claim.await.unwrap();
    assert_eq!(rows.len(), 3);

    let done: Vec<_> = rows.iter().map(|r| Delivered::new(r.pos).at(0, r.pos)).collect();
    store.mark_published(&lease, &done).await.unwrap();
    assert_eq!(
        store.status().await.unwrap().pending,
        0,
        "the mark reached the database"
    );
    let seen = store.observer().seen.lock().unwrap().clone();
    let of = |call| seen.iter().filter(|(c, ..)| *c == call).cloned().collect::<Vec<_>>();
    assert_eq!(of(StoreCall::Acquire), [(StoreCall::Acquire, 0, true)]);
    assert_eq!(of(StoreCall::Claim), [(StoreCall::Claim, 3, true)]);
    assert_eq!(of(StoreCall::MarkPublished), [(StoreCall::MarkPublished, 3, true)]);
}
