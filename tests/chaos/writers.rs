//! The writers' side: rollback, panics and aborted tasks inside the enqueueing transaction leak
//! nothing, and a full producer queue is back pressure only.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use outbox::{Message, StoreAdmin};
use outbox_tests::db::scalar;
use outbox_tests::embedded::drained;
use outbox_tests::kafka::{check_delivery, read_all, read_until};
use tokio::sync::oneshot;

use crate::{commit, config, counting_store, keyed, mock_with_topic, small_store, start};

/// Panics raised on purpose (message ending in "(on purpose)") are not printed; others are.
fn quiet_deliberate_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or_default();
            if !msg.ends_with("(on purpose)") {
                default(info);
            }
        }));
    });
}

/// What a writer task did: ids it committed and ids it enqueued but did not commit.
#[derive(Default)]
struct Written {
    committed: HashSet<uuid::Uuid>,
    not_committed: HashSet<uuid::Uuid>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_panic_and_abort_inside_the_enqueueing_transaction_leak_nothing() {
    let (_mock, bootstrap, t) = mock_with_topic("tx-panic", 4);
    let pool = outbox_tests::db::fresh_pg().await;
    outbox_tests::db::exec(&pool, "CREATE TABLE orders (id UUID PRIMARY KEY)").await;
    let store = small_store(&pool).await;
    // Few connections: a connection a panicking task dropped mid-transaction is reused at once.
    let writers_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let relay = start(store.clone(), &bootstrap, &[], config().batch_size(50));

    quiet_deliberate_panics();
    let written = Arc::new(std::sync::Mutex::new(Written::default()));
    // A task cancelled mid-transaction (request timeout, client gone) while holding key-0's counter
    // row: the writers of key-0 wait for it until it is aborted.
    let (wpool, t2, written2) = (writers_pool.clone(), t.clone(), written.clone());
    let (enqueued, holding) = oneshot::channel::<()>();
    let hung = tokio::spawn(async move {
        let m = Message::new(t2, "cancelled").key("key-0");
        written2.lock().unwrap().not_committed.insert(m.id());
        let mut tx = wpool.begin().await.unwrap();
        outbox::enqueue(&mut tx, &m).await.unwrap();
        enqueued.send(()).unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        tx.commit().await.unwrap();
    });
    holding.await.unwrap();

    let mut tasks = Vec::new();
    let mut panics = 0;
    for w in 0..6 {
        for i in 0..40 {
            let (pool, t, written) = (writers_pool.clone(), t.clone(), written.clone());
            let key = format!("key-{}", (w + i) % 8);
            let mode = (w + i) % 5;
            panics += usize::from(mode == 2);
            tasks.push(tokio::spawn(async move {
                let msgs: Vec<Message> = (0..3)
                    .map(|j| Message::new(t.clone(), format!("{w}-{i}-{j}")).key(key.clone()))
                    .collect();
                let ids: Vec<uuid::Uuid> = msgs.iter().map(|m| m.id()).collect();
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("INSERT INTO orders (id) VALUES ($1)")
                    .bind(ids[0])
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
                let committed = match mode {
                    0 | 1 => {
                        tx.commit().await.unwrap();
                        true
                    }
                    2 => {
                        written.lock().unwrap().not_committed.extend(&ids);
                        // The key's counter row is locked by this transaction: others of the key wait.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        panic!("writer panics while holding its transaction (on purpose)");
                    }
                    3 => {
                        tx.rollback().await.unwrap();
                        false
                    }
                    _ => {
                        drop(tx); // an early return (`?`) from the handler: rolled back on drop
                        false
                    }
                };
                let mut w = written.lock().unwrap();
                let set = if committed {
                    &mut w.committed
                } else {
                    &mut w.not_committed
                };
                set.extend(ids);
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    hung.abort();
    assert!(hung.await.unwrap_err().is_cancelled());
    let mut panicked = 0;
    for task in tasks {
        if let Err(e) = task.await {
            assert!(e.is_panic());
            panicked += 1;
        }
    }
    assert_eq!(panicked, panics);

    let (committed, not_committed) = {
        let w = written.lock().unwrap();
        (w.committed.clone(), w.not_committed.clone())
    };
    drained(&store, Duration::from_secs(60)).await;
    // Later writers of the same keys still commit (locks of the dead transactions were released).
    let after_msgs: Vec<Message> = (0..40)
        .map(|i| Message::new(t.clone(), "after").key(format!("key-{}", i % 8)))
        .collect();
    let after = commit(&writers_pool, &after_msgs).await;
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let mut expect = committed.clone();
    expect.extend(after);
    // The business rows are exactly those of the committed transactions.
    let orders: HashSet<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        orders.iter().all(|o| committed.contains(o)),
        "a business row of a rolled-back transaction stayed"
    );
    assert_eq!(orders.len() * 3, committed.len());
    // Nothing of the rolled-back transactions is in the outbox or its dead letters.
    let left: i64 = scalar(&pool, "SELECT count(*) FROM outbox_messages").await;
    assert_eq!(left, 0);
    assert!(store.dead_letters(5).await.unwrap().is_empty());
    // On the wire: all committed, none of the others (seqs dense per key: no seq was burnt).
    let seen = read_until(&bootstrap, &t, &expect, Duration::from_secs(60), Duration::from_secs(1)).await;
    let dups = check_delivery(&seen, &expect);
    assert!(seen.iter().all(|s| !not_committed.contains(&s.id)));
    assert_eq!(dups, 0);
    eprintln!(
        "rollback/panic: {} committed, {} rolled back ({panicked} by a panic, 1 cancelled) never left",
        expect.len(),
        not_committed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_queue_full_is_back_pressure_only() {
    let (mock, bootstrap, t) = mock_with_topic("queue-full", 4);
    // Slow acks keep the 50-message local queue full while 32 lanes push batches of 500.
    mock.broker_round_trip_time(1, Duration::from_millis(20)).unwrap();
    let pool = outbox_tests::db::fresh_pg().await;
    let store = counting_store(&pool).await;
    let mut expect: HashSet<uuid::Uuid> = HashSet::new();
    for r in 0..4 {
        expect.extend(commit(&pool, &keyed(&t, 1500, 64, &format!("r{r}"))).await);
    }
    let kafka = [("queue.buffering.max.messages", "50"), ("linger.ms", "1")];
    let relay = start(store.clone(), &bootstrap, &kafka, config().batch_size(500));
    drained(&store, Duration::from_secs(120)).await;
    relay.stop().await;
    assert!(
        store.dead_letters(5).await.unwrap().is_empty(),
        "a full queue must never dead-letter"
    );
    // (Counted as the relay marks them: the rows, and their attempts, are gone once published.)
    assert_eq!(store.observer().counted(), 0, "a full queue counts no attempt");
    let seen = read_all(&bootstrap, &t, &expect).await;
    let dups = check_delivery(&seen, &expect);
    assert_eq!(dups, 0, "back-pressure is not a failure: nothing is re-sent");
}
