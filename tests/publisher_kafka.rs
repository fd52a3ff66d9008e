//! The publisher conformance suite (`outbox_tests::publisher_suite`) on real Apache Kafka: the
//! shared single broker for most guarantees, a one-node cluster of the test's own for kills and
//! cuts.
//!
//! A cut is SIGSTOP/SIGCONT of the broker process, not a `TcpProxy`: a Kafka client bootstraps
//! through any address but then connects to the listener the broker advertises in its metadata
//! (`advertised.listeners`, the broker's own port), so a proxy in front of the bootstrap address
//! would be bypassed after the first metadata request. A stopped broker keeps its connections
//! open but answers nothing, so the producer gets no confirmation within `message.timeout.ms`;
//! the guarantees checked (no confirmation while cut, `Unavailable`, everything after restore)
//! are the same.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::Publisher;
use outbox_kafka::KafkaPublisher;
use outbox_tests::kafka::{broker, client, create_topic, has_leaders, topic, Cluster};
use outbox_tests::publisher_suite::{BrokerFixture, Received};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Partitions of each destination: keys spread over several, each key on one.
const PARTITIONS: i32 = 4;

/// Delivery timeout of the publisher under test: a confirmation that does not come within it is
/// `Unavailable`.
const MESSAGE_TIMEOUT_MS: &str = "5000";

/// The broker's `message.max.bytes` is Kafka's default (about 1 MiB); the producer's own limit is
/// raised above the oversize payload so that the broker, not the client, refuses it.
const OVERSIZE: usize = 2 * 1024 * 1024;

struct KafkaFixture {
    bootstrap: String,
    /// The test's own cluster (dedicated fixtures only).
    cluster: Option<Cluster>,
    /// Topics created so far: after a restart, the broker takes publishes once they have leaders.
    topics: Mutex<Vec<String>>,
    /// The broker process is SIGSTOPped.
    stopped: AtomicBool,
}

impl KafkaFixture {
    fn shared() -> KafkaFixture {
        KafkaFixture {
            bootstrap: broker(),
            cluster: None,
            topics: Mutex::default(),
            stopped: AtomicBool::new(false),
        }
    }

    fn dedicated() -> KafkaFixture {
        let cluster = tokio::task::block_in_place(|| Cluster::start(1));
        KafkaFixture {
            bootstrap: cluster.bootstrap(),
            cluster: Some(cluster),
            topics: Mutex::default(),
            stopped: AtomicBool::new(false),
        }
    }

    fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("only a dedicated fixture is killed or cut")
    }

    fn signal(&self, sig: &str) {
        let pid = std::fs::read_to_string(self.cluster().dir().join("n1/pid")).expect("broker pid file");
        let status = Command::new("kill").args([sig, pid.trim()]).status().expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Waits until every topic created so far has a leader for each partition.
    async fn wait_for_leaders(&self) {
        let topics = self.topics.lock().unwrap().clone();
        let consumer: BaseConsumer = client(&self.bootstrap).create().expect("metadata client");
        let start = Instant::now();
        loop {
            let ready = tokio::task::block_in_place(|| {
                topics.iter().all(|t| {
                    consumer
                        .fetch_metadata(Some(t), Duration::from_secs(5))
                        .is_ok_and(|md| has_leaders(&md, PARTITIONS))
                })
            });
            if ready {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "kafka: topics without leaders 90 s after the broker came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for KafkaFixture {
    fn drop(&mut self) {
        // A stopped broker would not stop on SIGTERM.
        if self.stopped.load(Ordering::SeqCst) {
            self.signal("-CONT");
        }
    }
}

#[async_trait]
impl BrokerFixture for KafkaFixture {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn destination(&self) -> String {
        let t = topic("suite");
        create_topic(&self.bootstrap, &t, PARTITIONS).await;
        self.topics.lock().unwrap().push(t.clone());
        t
    }

    async fn missing_destination(&self) -> String {
        // The brokers run with auto.create.topics.enable=false.
        topic("suite-missing")
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        let max = (OVERSIZE * 2).to_string();
        Arc::new(
            KafkaPublisher::new([
                ("bootstrap.servers", self.bootstrap.as_str()),
                ("message.timeout.ms", MESSAGE_TIMEOUT_MS),
                ("message.max.bytes", max.as_str()),
            ])
            .unwrap(),
        )
    }

    async fn read(&self, destination: &str, at_least: usize, timeout: Duration) -> Vec<Received> {
        let consumer: StreamConsumer = client(&self.bootstrap)
            .set("group.id", format!("suite-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let mut assignment = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            assignment
                .add_partition_offset(destination, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        let start = Instant::now();
        // Per partition (so per key) in offset order.
        let mut by_partition: HashMap<i32, Vec<Received>> = HashMap::new();
        let mut count = 0;
        while count < at_least {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            let Ok(res) = tokio::time::timeout(left, consumer.recv()).await else {
                break;
            };
            let Ok(m) = res else { continue };
            let mut r = Received {
                id: uuid::Uuid::nil(),
                key: None,
                seq: None,
                source: None,
                headers: Vec::new(),
                payload: m.payload().unwrap_or_default().to_vec(),
            };
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    let v = String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned();
                    match hd.key {
                        outbox::HEADER_ID => r.id = v.parse().unwrap_or_default(),
                        outbox::HEADER_KEY => r.key = Some(v.clone()),
                        outbox::HEADER_SEQ => r.seq = v.parse().ok(),
                        outbox::HEADER_SOURCE => r.source = Some(v.clone()),
                        _ => {}
                    }
                    r.headers.push((hd.key.to_owned(), v));
                }
            }
            // The Kafka message key is the outbox key.
            assert_eq!(
                m.key(),
                r.key.as_deref().map(str::as_bytes),
                "kafka: message key and outbox-key header differ"
            );
            by_partition.entry(m.partition()).or_default().push(r);
            count += 1;
        }
        let mut partitions: Vec<_> = by_partition.into_iter().collect();
        partitions.sort_by_key(|(p, _)| *p);
        partitions.into_iter().flat_map(|(_, rs)| rs).collect()
    }

    fn oversize(&self) -> usize {
        OVERSIZE
    }

    async fn kill(&self) {
        tokio::task::block_in_place(|| self.cluster().kill(1));
    }

    async fn start(&self) {
        tokio::task::block_in_place(|| self.cluster().restart(1));
        self.wait_for_leaders().await;
    }

    async fn cut(&self) {
        self.signal("-STOP");
        self.stopped.store(true, Ordering::SeqCst);
    }

    async fn restore(&self) {
        self.signal("-CONT");
        self.stopped.store(false, Ordering::SeqCst);
        self.wait_for_leaders().await;
    }
}

outbox_tests::publisher_suite!(shared = KafkaFixture::shared(), dedicated = KafkaFixture::dedicated(),);
