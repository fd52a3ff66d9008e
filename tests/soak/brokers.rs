//! The Kafka of the run: the local broker, librdkafka's mock cluster or a cluster of the run's own,
//! and the killer of that cluster's nodes.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_tests::kafka::Cluster;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::args::Args;

/// Whether every partition of every topic has all its replicas in sync and a leader, as the
/// cluster's metadata says (a restarted node has caught up). Blocking.
pub(crate) fn fully_in_sync(metadata: &BaseConsumer) -> bool {
    let Ok(md) = metadata.fetch_metadata(None, Duration::from_secs(5)) else {
        return false;
    };
    !md.topics().is_empty()
        && md.topics().iter().all(|t| {
            t.error().is_none()
                && t.partitions()
                    .iter()
                    .all(|p| p.error().is_none() && p.leader() >= 0 && p.isr().len() == p.replicas().len())
        })
}

/// Kills brokers of `cluster` until `stop`: every `every`, SIGKILLs one node picked at random,
/// restarts it on its log dirs 3-5 s later, and waits until every partition is fully in sync again
/// before the next kill may come (so never two nodes are down, nor one down while another is still
/// catching up). Counts the kills in `kills`.
pub(crate) fn spawn_broker_killer(
    cluster: Arc<Cluster>,
    nodes: u16,
    every: Duration,
    stop: Arc<AtomicBool>,
    kills: Arc<AtomicU64>,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut next = Instant::now() + every;
        loop {
            loop {
                if stop.load(Relaxed) {
                    return;
                }
                if Instant::now() >= next {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let node = rng.gen_range(1..=nodes);
            let down = Duration::from_millis(rng.gen_range(3000..=5000));
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.kill(node))
                .await
                .expect("kill broker");
            kills.fetch_add(1, Relaxed);
            println!(
                "  {:>6.0?}  broker node {node} SIGKILLed; restart in {down:.1?}",
                started.elapsed()
            );
            tokio::time::sleep(down).await;
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.restart(node))
                .await
                .expect("restart broker");
            let restarted = Instant::now();
            let (bootstrap, stop_waiting) = (cluster.bootstrap(), stop.clone());
            let in_sync = tokio::task::spawn_blocking(move || {
                let metadata: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .create()
                    .expect("metadata client");
                loop {
                    if fully_in_sync(&metadata) {
                        return true;
                    }
                    if stop_waiting.load(Relaxed) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .await
            .expect("wait for in-sync replicas");
            println!(
                "  {:>6.0?}  broker node {node} back{} {:.1?} after its restart",
                started.elapsed(),
                if in_sync {
                    ", every partition in sync"
                } else {
                    "; stopped waiting for the ISR"
                },
                restarted.elapsed()
            );
            next = (next + every).max(Instant::now());
        }
    })
}

/// librdkafka's mock cluster, in this process.
pub(crate) type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// The Kafka the run uses, `topic` created on it: its bootstrap servers, librdkafka's mock cluster
/// (`--bootstrap mock`, kept for the run) and the cluster of the run's own (`--cluster`).
pub(crate) async fn kafka(args: &Args, topic: &str) -> (String, Option<Mock>, Option<Arc<Cluster>>) {
    let mut mock_cluster = None;
    let mut cluster: Option<Arc<Cluster>> = None;
    let bootstrap = match (args.cluster, args.bootstrap.as_deref()) {
        (Some(nodes), _) => {
            println!("starting a Kafka cluster of {nodes} nodes (.ci/kafka)");
            let c = tokio::task::spawn_blocking(move || Cluster::start(nodes))
                .await
                .expect("start the Kafka cluster");
            let b = c.bootstrap();
            println!("      cluster {} at {b}", c.dir().display());
            outbox_tests::kafka::create_topic(&b, topic, args.partitions).await;
            cluster = Some(Arc::new(c));
            b
        }
        (None, Some("mock")) => {
            let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            mock.create_topic(topic, args.partitions, 1).expect("mock topic");
            let b = mock.bootstrap_servers();
            mock_cluster = Some(mock);
            b
        }
        (None, other) => {
            let b = other.map(str::to_owned).unwrap_or_else(outbox_tests::kafka::broker);
            outbox_tests::kafka::create_topic(&b, topic, args.partitions).await;
            b
        }
    };
    (bootstrap, mock_cluster, cluster)
}

/// Stops the cluster of the run's own, if any; after a failed run its nodes' logs are kept.
pub(crate) fn finish(cluster: Option<Arc<Cluster>>, failed: bool) {
    if let Some(c) = cluster.and_then(Arc::into_inner) {
        if failed {
            // Stop the nodes but keep their logs.
            let _ = Command::new("bash")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/kafka"))
                .arg("down")
                .arg(c.dir())
                .status();
            println!("kafka cluster kept for inspection: {}", c.dir().display());
            std::mem::forget(c);
        } else {
            println!("stopping the Kafka cluster");
            drop(c);
        }
    }
}
