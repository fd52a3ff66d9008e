//! Real Apache Kafka failing under the relay: a broker SIGKILLed and restarted on its log dirs, the
//! leader of the busiest partitions SIGKILLed in a three-node cluster, and two of three nodes down
//! (below `min.insync.replicas`) for longer than `message.timeout.ms`. Each test has a cluster of
//! its own (`.ci/kafka`), writers that keep committing while it fails, and an independent reader
//! that checks every committed message arrived, per-key seqs in order, duplicates within their bound
//! (when messages timed out: the last copies in order, see [`Wire`]).

use std::collections::HashSet;
use std::time::Duration;

use outbox::{Message, StoreAdmin, LANES};
use outbox_kafka::KafkaPublisher;
use outbox_relay::RelayConfig;
use outbox_tests::embedded::{drained, start, test_config, Running};
use outbox_tests::kafka::{check_delivery, check_delivery_after_timeouts, create_topic, read_until, topic, Cluster};
use tokio::task::JoinHandle;

const BATCH: usize = 100;

fn config() -> RelayConfig {
    test_config().batch_size(BATCH).max_attempts(3)
}

/// Commits `txs` transactions of 10 keyed messages (40 keys), one every `every`, while the test
/// breaks the cluster; returns the ids that committed.
fn writers(pool: sqlx::PgPool, t: String, txs: usize, every: Duration) -> JoinHandle<HashSet<uuid::Uuid>> {
    tokio::spawn(async move {
        let mut committed = HashSet::new();
        let mut tick = tokio::time::interval(every);
        for b in 0..txs {
            tick.tick().await;
            let msgs: Vec<Message> = (0..10)
                .map(|i| Message::new(t.clone(), format!("b{b}i{i}")).key(format!("key-{}", (b * 3 + i) % 40)))
                .collect();
            outbox_tests::db::commit_batch(&pool, &msgs).await;
            committed.extend(msgs.iter().map(|m| m.id()));
        }
        committed
    })
}

/// A relay on the cluster with the test's settings.
fn relay(store: &outbox::postgres::PgStore, cluster: &Cluster, extra: &[(&str, &str)], cfg: RelayConfig) -> Running {
    let bootstrap = cluster.bootstrap();
    let mut settings = vec![("bootstrap.servers", bootstrap.as_str())];
    settings.extend_from_slice(extra);
    start(store.clone(), KafkaPublisher::new(settings).unwrap(), cfg)
}

/// A test's cluster, a topic on it, and a fresh outbox database; `txs` transactions of writers.
struct Run {
    cluster: Cluster,
    t: String,
    store: outbox::postgres::PgStore,
    txs: usize,
}

impl Run {
    /// A cluster of `nodes`, a topic on it with `partitions` partitions, and a fresh outbox database
    /// with a relay on the cluster (`extra` producer settings, `cfg`) and writers committing `txs`
    /// transactions, one every `every`. Returns 3 s into the writing, with the relay and the writers.
    async fn start(
        nodes: u16,
        name: &str,
        partitions: i32,
        extra: &[(&str, &str)],
        cfg: RelayConfig,
        txs: usize,
        every: Duration,
    ) -> (Run, Running, JoinHandle<HashSet<uuid::Uuid>>) {
        let cluster = Cluster::start(nodes);
        let t = topic(name);
        create_topic(&cluster.bootstrap(), &t, partitions).await;
        let (pool, store) = outbox_tests::db::fresh_pg_store().await;
        let relay = relay(&store, &cluster, extra, cfg);
        let writing = writers(pool, t.clone(), txs, every);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let run = Run { cluster, t, store, txs };
        (run, relay, writing)
    }

    /// Waits for the writers (every transaction committed), drains, stops the relay, and checks with
    /// an independent reader: all arrived, in order per key, no dead letter, no message on the wire
    /// more than `wire.sends` times and duplicates within one batch per lane for each send after
    /// the first. Returns the ids committed and the duplicates.
    async fn settle(
        &self,
        relay: Running,
        writing: JoinHandle<HashSet<uuid::Uuid>>,
        wire: Wire,
    ) -> (HashSet<uuid::Uuid>, usize) {
        let Wire { sends, timed_out } = wire;
        let ids = writing.await.unwrap();
        assert_eq!(ids.len(), self.txs * 10);
        drained(&self.store, Duration::from_secs(180)).await;
        relay.stop().await;
        assert!(
            self.store.dead_letters(10).await.unwrap().is_empty(),
            "nothing is dead-lettered"
        );
        let seen = read_until(
            &self.cluster.bootstrap(),
            &self.t,
            &ids,
            Duration::from_secs(90),
            Duration::from_millis(500),
        )
        .await;
        let dups = if timed_out {
            check_delivery_after_timeouts(&seen, &ids)
        } else {
            check_delivery(&seen, &ids)
        };
        let mut copies = std::collections::HashMap::<uuid::Uuid, usize>::new();
        for s in &seen {
            *copies.entry(s.id).or_default() += 1;
        }
        let most = copies.values().copied().max().unwrap_or(0);
        assert!(most <= sends, "a message arrived {most} times, at most {sends} sends");
        assert!(dups <= BATCH * LANES as usize * (sends - 1), "{dups} duplicates");
        (ids, dups)
    }
}

/// What the wire may hold after a run.
struct Wire {
    /// The most times one message may have been sent. A send that times out may have been appended
    /// by a leader that waited for followers in vain, and the rows in flight are sent again after
    /// it: each timed-out send can add a copy.
    sends: usize,
    /// Messages timed out in librdkafka's queue: a key's later message may have been written before
    /// an earlier one that timed out there (librdkafka's documented gap), then both are sent again,
    /// so only the last copies per key are in seq order.
    timed_out: bool,
}

/// An outage shorter than the message timeout: nothing times out, at most one send again.
const NO_TIMEOUT: Wire = Wire {
    sends: 2,
    timed_out: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_killed_and_restarted_on_its_log_dirs_loses_nothing() {
    let (run, relay, writing) = Run::start(1, "broker-restart", 4, &[], config(), 400, Duration::from_millis(25)).await;
    run.cluster.kill(1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.cluster.restart(1);
    let (ids, dups) = run.settle(relay, writing, NO_TIMEOUT).await;
    eprintln!("broker restart: {} delivered, {dups} duplicates", ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_of_the_busiest_partitions_killed_mid_stream_loses_nothing() {
    let (run, relay, writing) = Run::start(3, "failover", 6, &[], config(), 600, Duration::from_millis(25)).await;
    let leader = run.cluster.busiest_leader(&run.t);
    run.cluster.kill(leader);
    // Past the broker session timeout (9 s): the controller fences it and moves its leaderships.
    tokio::time::sleep(Duration::from_secs(12)).await;
    run.cluster.restart(leader);
    let (ids, dups) = run.settle(relay, writing, NO_TIMEOUT).await;
    eprintln!("leader {leader} killed: {} delivered, {dups} duplicates", ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_three_brokers_down_past_the_message_timeout_dead_letters_nothing() {
    // A short delivery timeout and few attempts: an outage counted as attempts would dead-letter
    // every key's head within the outage.
    let (run, relay, writing) = Run::start(
        3,
        "min-isr",
        6,
        &[("message.timeout.ms", "5000")],
        config().max_attempts(2),
        500,
        Duration::from_millis(50),
    )
    .await;
    let down = std::time::Instant::now();
    run.cluster.kill(2);
    run.cluster.kill(3);
    // Four message timeouts with one broker of three: no partition has min.insync.replicas.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stuck = run.store.status().await.unwrap().pending;
    assert!(
        stuck > 0,
        "writes kept committing while the cluster could not take them"
    );
    assert!(
        run.store.dead_letters(10).await.unwrap().is_empty(),
        "an outage below min.insync.replicas dead-letters nothing"
    );
    run.cluster.restart(2);
    // Partitions whose leader survived kept appending while they waited for the dead followers:
    // each send that timed out (every 5 s of the outage) may be on the wire, and so may the one
    // that succeeds after it (one more for the send under way when the node came back).
    let sends = 2 + usize::try_from(down.elapsed().as_secs().div_ceil(5)).unwrap();
    let wire = Wire { sends, timed_out: true };
    let (ids, dups) = run.settle(relay, writing, wire).await;
    run.cluster.restart(3);
    eprintln!(
        "below min ISR for 20 s: {stuck} pending during, {} delivered, {dups} duplicates (at most {sends} sends)",
        ids.len()
    );
}
