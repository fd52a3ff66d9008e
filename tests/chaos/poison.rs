//! Poison rows: a corrupted row is dead-lettered (or parks its key under `Park`) and a topic the
//! producer is not authorized for is dead-lettered, while everything else flows.

use std::collections::HashSet;
use std::time::Duration;

use outbox::{Message, StoreAdmin};
use outbox_relay::DeadLetterPolicy;
use outbox_tests::embedded::{drained, wait_for, Running};
use outbox_tests::kafka::{check_delivery, check_delivery_skipping, read_all};
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaRespErr;

use crate::{commit, config, keyed, mock_topic, small_store, start, Mock};

struct Corrupt {
    bootstrap: String,
    topic: String,
    pool: sqlx::PgPool,
    store: outbox::postgres::PgStore,
    /// Key `bad`, seq 1..=4.
    bad: Vec<uuid::Uuid>,
    /// `bad` seq 2, its headers column overwritten with garbage.
    corrupt: uuid::Uuid,
    others: Vec<uuid::Uuid>,
}

/// Rows of key `bad` (seq 1..=4) with seq 2 corrupted, then rows of other keys in the same lanes;
/// and the relay started on them under `policy`.
async fn corrupt_setup(mock: &Mock, policy: DeadLetterPolicy) -> (Corrupt, Running) {
    let t = mock_topic(mock, "corrupt", 2);
    let pool = outbox_tests::db::fresh_pg().await;
    let store = small_store(&pool).await;
    let bad: Vec<Message> = (1..=4)
        .map(|i| Message::new(t.clone(), format!("bad{i}")).key("bad"))
        .collect();
    let bad_ids = commit(&pool, &bad).await;
    // Later rows of every lane (64 keys cover the 32 lanes), after the corrupt row.
    let others = commit(&pool, &keyed(&t, 640, 64, "o")).await;
    let hit = sqlx::query("UPDATE outbox_messages SET headers = 'not json' WHERE id = $1")
        .bind(bad_ids[1])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(hit.rows_affected(), 1);
    let bootstrap = mock.bootstrap_servers();
    let relay = start(store.clone(), &bootstrap, &[], config().dead_letter_policy(policy));
    let corrupt = Corrupt {
        bootstrap,
        topic: t,
        pool,
        store,
        corrupt: bad_ids[1],
        bad: bad_ids,
        others,
    };
    (corrupt, relay)
}

impl Corrupt {
    /// Reads the topic until `expect` is there: every one arrived once, each key's seqs in order
    /// but for the corrupt row's (key `bad`, seq 2).
    async fn check_delivered(&self, expect: &HashSet<uuid::Uuid>) {
        let seen = read_all(&self.bootstrap, &self.topic, expect).await;
        let dups = check_delivery_skipping(&seen, expect, &HashSet::from([("bad".to_owned(), 2)]));
        assert_eq!(dups, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_row_is_dead_lettered_and_everything_else_flows() {
    let mock = MockCluster::new(1).unwrap();
    let (c, relay) = corrupt_setup(&mock, DeadLetterPolicy::Skip).await;
    drained(&c.store, Duration::from_secs(60)).await;
    relay.stop().await;
    let dl = c.store.dead_letters(10).await.unwrap();
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0].id, c.corrupt);
    assert!(dl[0].error.contains("corrupt"), "{}", dl[0].error);
    assert!(!dl[0].parked);
    let mut expect: HashSet<uuid::Uuid> = c.others.iter().copied().collect();
    expect.extend(c.bad.iter().filter(|id| **id != c.corrupt));
    c.check_delivered(&expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_row_parks_its_key_under_park_while_other_keys_flow() {
    let mock = MockCluster::new(1).unwrap();
    let (c, relay) = corrupt_setup(&mock, DeadLetterPolicy::Park).await;
    let store = &c.store;
    // Everything but the parked key's rows after the corrupt one (seq 3, 4) goes out.
    wait_for("all but the parked key published", Duration::from_secs(60), || async {
        store.status().await.unwrap().pending == 2 && store.status().await.unwrap().dead_letters == 1
    })
    .await;
    let before: HashSet<uuid::Uuid> = c.others.iter().copied().chain([c.bad[0]]).collect();
    let seen = read_all(&c.bootstrap, &c.topic, &before).await;
    let ids: HashSet<uuid::Uuid> = seen.iter().map(|s| s.id).collect();
    assert_eq!(ids, before, "the parked key's later rows must wait");
    let waiting: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM outbox_messages ORDER BY seq")
        .fetch_all(&c.pool)
        .await
        .unwrap();
    assert_eq!(waiting, c.bad[2..].to_vec());
    let dl = store.dead_letters(10).await.unwrap();
    assert_eq!((dl[0].id, dl[0].parked), (c.corrupt, true));
    // The operator discards the corrupt row: the key moves on, in order.
    assert!(store.discard_dead_letter(c.corrupt).await.unwrap());
    drained(store, Duration::from_secs(60)).await;
    relay.stop().await;
    let mut expect = before;
    expect.extend(&c.bad[2..]);
    c.check_delivered(&expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topic_authorization_failure_is_dead_lettered_while_other_topics_flow() {
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let allowed = mock_topic(&mock, "allowed", 2);
    let denied = mock_topic(&mock, "denied", 2);
    mock.topic_error(&denied, RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
        .unwrap();
    let pool = outbox_tests::db::fresh_pg().await;
    let store = small_store(&pool).await;
    let no: Vec<uuid::Uuid> = commit(&pool, &keyed(&denied, 6, 2, "d")).await;
    let yes: HashSet<uuid::Uuid> = commit(&pool, &keyed(&allowed, 300, 20, "a"))
        .await
        .into_iter()
        .collect();
    let kafka = [("message.timeout.ms", "10000")];
    let relay = start(store.clone(), &bootstrap, &kafka, config().max_attempts(5));
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;
    let dl = store.dead_letters(10).await.unwrap();
    let dead: HashSet<uuid::Uuid> = dl.iter().map(|d| d.id).collect();
    assert_eq!(
        dead,
        no.iter().copied().collect(),
        "exactly the denied topic's messages are dead letters"
    );
    for d in &dl {
        // Permanent at once: not dead-lettered for running out of attempts. (A message queued behind
        // a failed one of its key is held back once, so it may show 2 attempts.)
        assert!(d.error.contains("TopicAuthorizationFailed"), "{}", d.error);
        assert!(d.attempts <= 2, "{d:?}");
    }
    let seen = read_all(&bootstrap, &allowed, &yes).await;
    assert_eq!(check_delivery(&seen, &yes), 0);
    eprintln!("authorization: {} dead letters, e.g. {:?}", dl.len(), dl[0].error);
}
