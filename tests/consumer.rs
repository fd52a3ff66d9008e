//! The consumer runner on the real broker: ack after processing, effects once under duplicates,
//! handler failures, poison messages, a restart before the offset commit, and a rebalance.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_kafka::{ConsumerConfig, ConsumerRunner, ConsumerStats};
use outbox_tests::effects::effects_db;
use outbox_tests::kafka::{broker, create_topic, read_until, topic};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Boom(String);

/// Writes one effect row per processed message; fails the first `fail_first` attempts of each.
#[derive(Clone, Default)]
struct Effects {
    fail_first: u32,
    poison: Option<String>,
    attempts: Arc<Mutex<HashMap<uuid::Uuid, u32>>>,
}

#[async_trait]
impl Handler<sqlx::Postgres> for Effects {
    type Error = Boom;
    async fn handle(&self, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, msg: &Incoming<'_>) -> Result<(), Boom> {
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(msg.id).or_default();
            *n += 1;
            *n
        };
        if n <= self.fail_first || self.poison.as_deref().map(str::as_bytes) == Some(msg.payload) {
            return Err(Boom(format!("attempt {n} failed on purpose")));
        }
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(msg.id)
            .execute(&mut **tx)
            .await
            .map_err(|e| Boom(e.to_string()))?;
        Ok(())
    }
}

async fn effect_counts(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Produces messages as the relay would (outbox headers), each `times` times.
async fn produce(bootstrap: &str, t: &str, n: usize, keys: usize, times: usize) -> Vec<uuid::Uuid> {
    produce_keys(bootstrap, t, "k", n, keys, times).await
}

/// Sends one keyed message with the outbox headers a relay would set.
async fn send_keyed(producer: &FutureProducer, t: &str, id: uuid::Uuid, key: &str, seq: i64) {
    let (id, seq) = (id.to_string(), seq.to_string());
    let h = OwnedHeaders::new()
        .insert(Header {
            key: outbox::HEADER_ID,
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: outbox::HEADER_KEY,
            value: Some(key.as_bytes()),
        })
        .insert(Header {
            key: outbox::HEADER_SEQ,
            value: Some(seq.as_bytes()),
        });
    producer
        .send(
            FutureRecord::to(t).key(key).payload("effect").headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

async fn produce_keys(bootstrap: &str, t: &str, prefix: &str, n: usize, keys: usize, times: usize) -> Vec<uuid::Uuid> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut ids = Vec::new();
    let mut seq: HashMap<String, i64> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..n {
        let id = uuid::Uuid::now_v7();
        let key = format!("{prefix}{}", i % keys);
        let s = seq.entry(key.clone()).or_default();
        *s += 1;
        ids.push(id);
        batch.push((id, key, *s));
    }
    for _ in 0..times {
        for (id, key, s) in &batch {
            send_keyed(&producer, t, *id, key, *s).await;
        }
    }
    ids
}

fn start(
    bootstrap: &str,
    group: &str,
    t: &str,
    pool: sqlx::PgPool,
    handler: Effects,
    cfg: ConsumerConfig,
    extra: &[(&str, &str)],
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, task, _) = start_with_stats(bootstrap, group, t, pool, handler, cfg, extra);
    (stop, task)
}

/// [`start`], also returning the runner's live counters.
fn start_with_stats(
    bootstrap: &str,
    group: &str,
    t: &str,
    pool: sqlx::PgPool,
    handler: Effects,
    cfg: ConsumerConfig,
    extra: &[(&str, &str)],
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>, Arc<ConsumerStats>) {
    let mut settings = vec![
        ("bootstrap.servers", bootstrap),
        ("group.id", group),
        ("session.timeout.ms", "6000"),
    ];
    settings.extend_from_slice(extra);
    let runner = ConsumerRunner::new(settings, &[t], pool, Inbox::new("effects"), handler)
        .unwrap()
        .config(cfg);
    let stats = runner.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        runner
            .run_until(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (tx, task, stats)
}

async fn wait_effects(pool: &sqlx::PgPool, n: i64, within: Duration) {
    let start = Instant::now();
    while effect_counts(pool).await.1 < n {
        assert!(
            start.elapsed() < within,
            "only {:?} of {n} effects",
            effect_counts(pool).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fast() -> ConsumerConfig {
    ConsumerConfig::default()
        .backoff_base(Duration::from_millis(20))
        .max_attempts(5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_delivered_twice_has_its_effect_once() {
    let b = broker();
    let t = topic("consume-twice");
    create_topic(&b, &t, 2).await;
    let pool = effects_db().await;
    let ids = produce(&b, &t, 200, 10, 2).await;
    let group = topic("g");
    let (stop, task) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (200, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_before_offset_commit_redelivers_and_the_effect_stays_single() {
    let b = broker();
    let t = topic("consume-restart");
    create_topic(&b, &t, 1).await;
    let pool = effects_db().await;
    let ids = produce(&b, &t, 100, 5, 1).await;
    let group = topic("g");
    // No auto-commit: the first consumer dies with its DB work committed and no offset committed.
    let handler = Effects::default();
    let (_stop, task) = start(
        &b,
        &group,
        &t,
        pool.clone(),
        handler.clone(),
        fast(),
        &[("enable.auto.commit", "false")],
    );
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    task.abort(); // the process "dies": no graceful commit
    let _ = task.await;
    let first: u32 = handler.attempts.lock().unwrap().values().sum();
    assert_eq!(first, 100);

    let handler2 = Effects::default();
    let (stop, task, stats) = start_with_stats(&b, &group, &t, pool.clone(), handler2.clone(), fast(), &[]);
    outbox_tests::embedded::wait_for("all 100 redelivered", Duration::from_secs(60), || {
        let n = stats.duplicates.load(std::sync::atomic::Ordering::Relaxed);
        async move { n == 100 }
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap();
    // The second consumer received all 100 again (it committed offset 100 for them) ...
    assert_eq!(
        committed(&b, &group, &t).await,
        100,
        "messages were redelivered and acked"
    );
    // ... and the inbox recognised every one: the handler never ran, the effects stayed single.
    assert_eq!(
        handler2.attempts.lock().unwrap().values().sum::<u32>(),
        0,
        "duplicates never reach the handler"
    );
    assert_eq!(effect_counts(&pool).await, (100, 100));
}

/// The group's committed offset of partition 0.
async fn committed(bootstrap: &str, group: &str, t: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(t, 0);
    let tpl = tokio::task::spawn_blocking(move || c.committed_offsets(tpl, Duration::from_secs(10)).unwrap())
        .await
        .unwrap();
    match tpl.find_partition(t, 0).unwrap().offset() {
        rdkafka::Offset::Offset(o) => o,
        other => panic!("no committed offset: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handler_failing_twice_then_succeeding_has_its_effect_once() {
    let b = broker();
    let t = topic("consume-retry");
    create_topic(&b, &t, 1).await;
    let pool = effects_db().await;
    let ids = produce(&b, &t, 30, 3, 1).await;
    let handler = Effects {
        fail_first: 2,
        ..Default::default()
    };
    let group = topic("g");
    let (stop, task) = start(&b, &group, &t, pool.clone(), handler.clone(), fast(), &[]);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (30, 30));
    assert!(handler.attempts.lock().unwrap().values().all(|n| *n == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_go_to_the_dead_letter_topic_and_later_messages_go_on() {
    let b = broker();
    let t = topic("consume-poison");
    let dlq = format!("{t}.dlq");
    create_topic(&b, &t, 1).await;
    create_topic(&b, &dlq, 1).await;
    let pool = effects_db().await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    // 1) no outbox-id header at all; 2) a handler that always fails on payload "poison".
    producer
        .send(
            FutureRecord::<(), _>::to(&t).payload("no headers"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let pid = uuid::Uuid::now_v7().to_string();
    let h = OwnedHeaders::new().insert(Header {
        key: outbox::HEADER_ID,
        value: Some(pid.as_bytes()),
    });
    producer
        .send(
            FutureRecord::<(), _>::to(&t).payload("poison").headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let ids = produce(&b, &t, 20, 2, 1).await;
    let handler = Effects {
        poison: Some("poison".into()),
        ..Default::default()
    };
    let group = topic("g");
    let (stop, task) = start(&b, &group, &t, pool.clone(), handler, fast().max_attempts(3), &[]);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (20, 20));
    let expect: HashSet<uuid::Uuid> = HashSet::from([pid.parse().unwrap()]);
    let dead = read_until(&b, &dlq, &expect, Duration::from_secs(30), Duration::from_secs(1)).await;
    assert_eq!(dead.len(), 2, "both poison messages are on the dead-letter topic");
    let errs: Vec<String> = dead
        .iter()
        .map(|d| {
            let e = d
                .headers
                .iter()
                .find(|(k, _)| k == outbox_kafka::HEADER_ERROR)
                .expect("error header");
            String::from_utf8_lossy(&e.1).into_owned()
        })
        .collect();
    assert!(errs.iter().any(|e| e.contains("outbox-id")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("failed on purpose")), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_and_a_rebalance_mid_stream_apply_every_effect_exactly_once() {
    let b = broker();
    let t = topic("consume-rebalance");
    create_topic(&b, &t, 4).await;
    let pool = effects_db().await;
    let group = topic("g");
    let (stop_a, a) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    let mut ids = produce(&b, &t, 300, 40, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stop_b, bb) = start(&b, &group, &t, pool.clone(), Effects::default(), fast(), &[]);
    ids.extend(produce_keys(&b, &t, "second-", 300, 40, 1).await);
    wait_effects(&pool, ids.len() as i64, Duration::from_secs(90)).await;
    stop_a.send(()).unwrap();
    a.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_b.send(()).unwrap();
    bb.await.unwrap();
    assert_eq!(effect_counts(&pool).await, (600, 600), "every effect exactly once");
}

/// Waits until the dead-letter topic `dlq` has stayed empty for 3 s; returns what it held.
async fn dead_letter_topic(bootstrap: &str, dlq: &str) -> usize {
    read_until(bootstrap, dlq, &HashSet::new(), Duration::from_secs(3), Duration::ZERO)
        .await
        .len()
}

/// Terminates every connection to `db` (they come back with the database's current settings).
async fn drop_connections(admin: &sqlx::PgPool, db: &str) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db)
    .execute(admin)
    .await
    .unwrap();
}

/// A consumer database outage mid-stream: 400 messages, the runner on `runner_pool`; `outage`
/// breaks the database after the first 50 effects and mends it before returning. Afterwards every
/// effect is there once, nothing was dead-lettered, and the runner saw the outage.
async fn outage_mid_stream<F, Fut>(name: &str, pool: &sqlx::PgPool, runner_pool: sqlx::PgPool, outage: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let b = broker();
    let t = topic(name);
    let dlq = format!("{t}.dlq");
    create_topic(&b, &t, 2).await;
    create_topic(&b, &dlq, 1).await;
    let ids = produce(&b, &t, 400, 20, 1).await;
    let (stop, task, stats) = start_with_stats(&b, &topic("g"), &t, runner_pool, Effects::default(), fast(), &[]);
    wait_effects(pool, 50, Duration::from_secs(60)).await;
    outage().await;
    wait_effects(pool, ids.len() as i64, Duration::from_secs(90)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(pool).await, (400, 400), "every effect exactly once");
    assert_eq!(stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(
        stats.infrastructure_retries.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the outage was seen"
    );
    assert_eq!(dead_letter_topic(&b, &dlq).await, 0, "nothing on the dead-letter topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_database_read_only_for_a_while_dead_letters_nothing() {
    let pool = effects_db().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&outbox_tests::db::pg_url()).await.unwrap();
    // A failover's read-only phase for 3 s: every write of the inbox fails (SQLSTATE 25006).
    let read_only = |on: bool| {
        let sql = if on {
            format!("ALTER DATABASE {db} SET default_transaction_read_only = on")
        } else {
            format!("ALTER DATABASE {db} RESET default_transaction_read_only")
        };
        let (admin, db) = (admin.clone(), db.clone());
        async move {
            sqlx::query(&sql).execute(&admin).await.unwrap();
            drop_connections(&admin, &db).await;
        }
    };
    outage_mid_stream("consume-read-only", &pool, pool.clone(), || async {
        read_only(true).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        read_only(false).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_database_unreachable_then_back_dead_letters_nothing() {
    let pool = effects_db().await;
    let proxy = outbox_tests::proxy::DbProxy::start().await;
    let through_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with((*pool.connect_options()).clone().port(proxy.port))
        .await
        .unwrap();
    // The database stops answering (connections dropped, new ones refused) for 15 s: longer than
    // max_attempts (5) tries of 2 s (the pool's acquire timeout) each.
    outage_mid_stream("consume-db-down", &pool, through_proxy, || async {
        proxy.cut();
        tokio::time::sleep(Duration::from_secs(15)).await;
        proxy.restore().await;
    })
    .await;
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
    let b = broker();
    let t = topic("consume-group");
    create_topic(&b, &t, 6).await;
    let pool = effects_db().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_runner_deletes_expired_inbox_records_on_a_schedule() {
    let b = broker();
    let t = topic("consume-cleanup");
    create_topic(&b, &t, 1).await;
    let pool = effects_db().await;
    // Unkeyed messages: the inbox keeps one record each, for its retention.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    for _ in 0..50 {
        let id = uuid::Uuid::now_v7().to_string();
        let h = OwnedHeaders::new().insert(Header {
            key: outbox::HEADER_ID,
            value: Some(id.as_bytes()),
        });
        producer
            .send(
                FutureRecord::<str, str>::to(&t).payload("effect").headers(h),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let group = topic("g");
    let settings = [("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
    let inbox = Inbox::new("effects").retention(Duration::from_millis(1));
    let cfg = fast().cleanup_interval(Some(Duration::from_millis(300)));
    let runner = ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox, Effects::default())
        .unwrap()
        .config(cfg);
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = rx.await;
    }));
    wait_effects(&pool, 50, Duration::from_secs(60)).await;
    outbox_tests::embedded::wait_for("expired inbox records deleted", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_inbox_messages")
                .fetch_one(&pool)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inbox_that_forgets_unkeyed_messages_before_the_topic_does_is_reported() {
    let b = broker();
    let t = topic("consume-retention");
    create_topic(&b, &t, 1).await; // the broker's default retention: 7 days
    let pool = effects_db().await;
    let group = topic("g");
    let runner = |inbox: Inbox, extra: Option<(&'static str, &'static str)>| {
        let mut settings = vec![("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
        settings.extend(extra);
        ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox, Effects::default()).unwrap()
    };
    let day = Duration::from_secs(24 * 3600);
    let short = runner(Inbox::new("effects").retention(day), None)
        .check_retention()
        .await
        .unwrap();
    assert_eq!(short.len(), 1, "{short:?}");
    assert!(
        short[0].contains(&t) && short[0].contains("retention.ms=604800000"),
        "{}",
        short[0]
    );
    let long = runner(Inbox::new("effects").retention(8 * day), None)
        .check_retention()
        .await
        .unwrap();
    assert!(long.is_empty(), "{long:?}");
    let latest = runner(
        Inbox::new("effects").retention(day),
        Some(("auto.offset.reset", "latest")),
    )
    .check_retention()
    .await
    .unwrap();
    assert!(
        latest.is_empty(),
        "a group that starts at the end reads nothing again: {latest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_hold_a_successor_ahead_of_its_predecessor_never_stalls_the_runner() {
    let b = broker();
    let t = topic("consume-hold");
    create_topic(&b, &t, 1).await;
    let pool = effects_db().await;
    // One partition: K:2, then other keys, then K:1 (as after a relay's re-send), then more others.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    let send = |key: String, seq: i64| {
        let producer = producer.clone();
        let t = t.clone();
        async move {
            let id = uuid::Uuid::now_v7();
            send_keyed(&producer, &t, id, &key, seq).await;
            id
        }
    };
    let k2 = send("K".into(), 2).await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(send(format!("other-{i}"), 1).await);
    }
    let k1 = send("K".into(), 1).await;
    for i in 20..40 {
        others.push(send(format!("other-{i}"), 1).await);
    }
    let group = topic("g");
    let settings = [("bootstrap.servers", b.as_str()), ("group.id", group.as_str())];
    let inbox = Inbox::new("effects").gap_policy(outbox_inbox::GapPolicy::Hold);
    let runner = ConsumerRunner::new(settings, &[t.as_str()], pool.clone(), inbox, Effects::default())
        .unwrap()
        .config(fast());
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = rx.await;
    }));
    wait_effects(&pool, 42, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("shutdown returns")
        .unwrap()
        .unwrap();
    assert_eq!(effect_counts(&pool).await, (42, 42), "every effect exactly once");
    let order: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT message_id FROM effects ORDER BY n")
        .fetch_all(&pool)
        .await
        .unwrap();
    let pos = |id: uuid::Uuid| order.iter().position(|x| *x == id).unwrap();
    assert!(pos(k1) < pos(k2), "K:1 applied before K:2");
    assert_eq!(pos(k2), pos(k1) + 1, "K:2 applied right after K:1");
    assert!(
        others.iter().take(20).all(|o| pos(*o) < pos(k1)),
        "the keys behind K:2 did not wait for K:1"
    );
}
