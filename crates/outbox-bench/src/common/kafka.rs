//! The brokers: topics (create, delete), the local Apache Kafka broker and its process.

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use super::{Env, PARTITIONS};

/// Creates a topic with [`PARTITIONS`] partitions and a unique name (on the mock cluster: takes
/// one of the topics created at start).
pub(crate) async fn new_topic(env: &Env, bootstrap: &str, prefix: &str) -> anyhow::Result<String> {
    if env.mock.as_deref() == Some(bootstrap) {
        return env
            .mock_topics
            .lock()
            .expect("mock topics lock")
            .pop()
            .context("out of pre-created mock cluster topics");
    }
    let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let res = admin
        .create_topics(
            &[NewTopic::new(&name, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(name)
}

/// The local Apache Kafka broker's directory (`.ci/kafka up`, as `.ci/services` starts it).
const KAFKA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/kafka/single");

/// Starts the local Apache Kafka broker with the repository's script if nothing listens on
/// 127.0.0.1:19092 (`OUTBOX_BENCH_KAFKA` names another one).
pub(crate) fn kafka_bootstrap() -> anyhow::Result<String> {
    if let Ok(b) = std::env::var("OUTBOX_BENCH_KAFKA") {
        return Ok(b);
    }
    let port = 19092;
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/kafka");
        let st = std::process::Command::new("bash")
            .arg(script)
            .args(["up", KAFKA_DIR, "1", &port.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), ".ci/kafka up failed");
    }
    Ok(format!("127.0.0.1:{port}"))
}

/// The pid of the local Kafka broker, if it was started by `.ci/kafka`.
pub(crate) fn broker_pid() -> Option<u32> {
    let dir = std::fs::read_to_string("/tmp/outbox-kafka-19092.dir")
        .map_or_else(|_| KAFKA_DIR.to_owned(), |d| d.trim().to_owned());
    std::fs::read_to_string(format!("{dir}/n1/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Deletes a topic (best effort: frees the broker's memory between runs; not on the mock cluster).
pub(crate) async fn delete_topic(env: &Env, bootstrap: &str, topic: &str) {
    if env.mock.as_deref() == Some(bootstrap) {
        return;
    }
    let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let _ = tokio::time::timeout(Duration::from_secs(15), admin.delete_topics(&[topic], &opts)).await;
}
