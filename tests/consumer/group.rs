//! Consumer groups: a rebalance mid-stream, and members in their own processes that join, leave
//! and get SIGKILLed under load; every effect applied once.

use std::time::Duration;

use outbox_tests::kafka::topic;

use crate::{effect_counts, fast, produce, produce_keys, start, topic_and_db, wait_effects, Effects};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_and_a_rebalance_mid_stream_apply_every_effect_exactly_once() {
    let (b, t, pool) = topic_and_db("consume-rebalance", 4).await;
    let group = topic("g");
    let (stop_a, a, stats_a) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    let mut ids = produce(&b, &t, 300, 40, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stop_b, bb, stats_b) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    ids.extend(produce_keys(&b, &t, "second-", 300, 40, 1).await);
    // The rebalance happened: B was given partitions and applied from them (more messages until
    // it has, should A have applied all before B's assignment came).
    let processed =
        |s: &std::sync::Arc<outbox_kafka::ConsumerStats>| s.processed.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    while processed(&stats_b) == 0 {
        assert!(std::time::Instant::now() < deadline, "B was never given a partition");
        ids.extend(produce_keys(&b, &t, &format!("more-{round}-"), 20, 20, 1).await);
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(processed(&stats_a) > 0, "A applied nothing");
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(90)).await;
    stop_a.send(()).unwrap();
    a.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_b.send(()).unwrap();
    bb.await.unwrap();
    let n = ids.len() as i64;
    assert_eq!(effect_counts(&pool).await, (n, n), "every effect exactly once");
}

/// A partition whose message waits for its retry, revoked (another member joined) and assigned
/// back later: the runner kept the partition's waiting state across the revoke and, when the
/// partition came back, rewound it to that message, although the other member had dead-lettered
/// it and gone on meanwhile; it then retried it for ever, and nothing after it in the partition
/// was applied. A revoked partition's waiting state is now dropped (and its pause lifted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_revoked_while_its_message_waits_is_read_from_its_committed_offset_when_it_comes_back() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (b, t, pool) = topic_and_db("consume-revoked", 2).await;
    let dlq = format!("{t}.dlq");
    outbox_tests::kafka::create_topic(&b, &dlq, 1).await;
    let producer: FutureProducer = outbox_tests::kafka::client(&b).create().unwrap();
    // A poison message at the head of each partition.
    let mut poison = std::collections::HashSet::new();
    for p in 0..2 {
        let id = uuid::Uuid::now_v7();
        let text = id.to_string();
        let h = outbox_kafka::wire_headers([(outbox::HEADER_ID, Some(text.as_str()))]);
        let record = FutureRecord::<(), _>::to(&t).partition(p).payload("poison").headers(h);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
        poison.insert(id);
    }
    let poisoned = || Effects {
        poison: Some("poison".into()),
        ..Default::default()
    };
    let group = topic("g");
    // A retries its poison messages every few seconds, for ever.
    let patient = fast()
        .max_attempts(1000)
        .backoff_base(Duration::from_secs(3))
        .backoff_max(Duration::from_secs(3));
    let (stop_a, a, _) = start(&b, &group, &t, pool.clone(), poisoned(), patient, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // B takes one of the two partitions, dead-letters its poison at once and goes on.
    let (stop_b, bb, _) = start(&b, &group, &t, pool.clone(), poisoned(), fast().max_attempts(1), &[]);
    let dead =
        outbox_tests::kafka::read_until(&b, &dlq, &poison, Duration::from_secs(60), Duration::from_millis(500)).await;
    assert_eq!(dead.len(), 1, "B dead-lettered the poison of the partition it took");
    let header = |n: &str| {
        dead[0]
            .headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let moved: i32 = header(outbox_kafka::HEADER_ORIGINAL_PARTITION)
        .unwrap()
        .parse()
        .unwrap();
    let send_to_moved = |n: usize| {
        let (producer, t) = (producer.clone(), t.clone());
        async move {
            for _ in 0..n {
                let id = uuid::Uuid::now_v7().to_string();
                let h = outbox_kafka::wire_headers([(outbox::HEADER_ID, Some(id.as_str()))]);
                let record = FutureRecord::<(), _>::to(&t)
                    .partition(moved)
                    .payload("effect")
                    .headers(h);
                producer.send(record, Duration::from_secs(10)).await.unwrap();
            }
        }
    };
    send_to_moved(3).await;
    wait_effects(&pool, 3, Duration::from_secs(30)).await;
    // B leaves: the partition goes back to A, which must read it from B's committed offset.
    stop_b.send(()).unwrap();
    bb.await.unwrap();
    send_to_moved(3).await;
    wait_effects(&pool, 6, Duration::from_secs(60)).await;
    stop_a.send(()).unwrap();
    a.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (6, 6));
}

/// A consumer-group member in its own process (`consumer-member`), to SIGKILL.
struct Member(std::process::Child);

impl Member {
    fn start(b: &str, t: &str, group: &str, pool: &sqlx::PgPool) -> Member {
        let db = pool.connect_options().get_database().unwrap().to_owned();
        let url = format!("{}/{db}", outbox_tests::db::pg_url().rsplit_once('/').unwrap().0);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_consumer-member"))
            .args([b, t, group, &url])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start consumer-member");
        Member(child)
    }

    fn signal(&mut self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// SIGTERM: leaves the group after committing; must exit 0.
    fn stop(mut self) {
        self.signal("-TERM");
        let st = self.0.wait().unwrap();
        assert!(st.success(), "member exited with {st}");
    }

    /// SIGKILL: gone without a word, whatever it was doing.
    fn kill(mut self) {
        self.signal("-KILL");
        self.0.wait().unwrap();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_whose_members_join_leave_and_get_killed_under_load_applies_every_effect_once() {
    let (b, t, pool) = topic_and_db("consume-group", 6).await;
    let group = topic("g");
    let mut members = vec![
        Member::start(&b, &t, &group, &pool),
        Member::start(&b, &t, &group, &pool),
        Member::start(&b, &t, &group, &pool),
    ];
    // Load: 3,000 keyed messages in 10 bursts over about 5 s, while the group changes.
    let (b2, t2) = (b.clone(), t.clone());
    let producing = tokio::spawn(async move {
        let mut ids = Vec::new();
        for burst in 0..10 {
            ids.extend(produce_keys(&b2, &t2, &format!("b{burst}-"), 300, 30, 1).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        ids
    });
    wait_effects(&pool, 300, Duration::from_secs(60)).await;
    members.remove(1).kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    members.push(Member::start(&b, &t, &group, &pool));
    tokio::time::sleep(Duration::from_secs(1)).await;
    members.remove(0).stop();
    let ids = producing.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    members.remove(0).kill();
    members.push(Member::start(&b, &t, &group, &pool));

    wait_effects(&pool, ids.len() as i64, Duration::from_secs(120)).await;
    for m in members {
        m.stop();
    }
    assert_eq!(
        effect_counts(&pool).await,
        (ids.len() as i64, ids.len() as i64),
        "every effect exactly once"
    );
}
