//! RabbitMQ for the tests: the shared node `.ci/rabbitmq up` starts (127.0.0.1:5672), nodes of a
//! test's own (to SIGKILL and start again on their data), queues, and an independent reader.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use outbox_inbox::{Handler, Inbox};
use outbox_rabbitmq::{ConsumerStats, RabbitConsumerConfig, RabbitConsumerRunner};
use outbox_tests::consuming::{ci_script, run_ci_script, run_until_stopped};
use outbox_tests::embedded::Running;
use outbox_tests::publisher_suite::Received;

fn run_script(args: &[&str]) -> String {
    run_ci_script("rabbitmq", args, &[])
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A RabbitMQ node: the shared one, or one of the test's own (stopped and removed on drop).
pub struct Node {
    pub port: u16,
    dir: Option<PathBuf>,
}

impl Node {
    /// The shared node on 127.0.0.1:5672 (started if nothing listens there; never stopped).
    pub fn shared() -> Node {
        if !port_open(5672) {
            run_script(&["up"]);
        }
        Node { port: 5672, dir: None }
    }

    /// A node of the test's own: own name, AMQP port and data directory under `target/rabbitmq`.
    pub fn dedicated() -> Node {
        let port = free_port();
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/rabbitmq"))
            .join(format!("node-{}", uuid::Uuid::new_v4().simple()));
        // The guard first: a start that fails (the node not up in time) stops the Erlang VM that
        // did start, instead of leaving it running.
        let node = Node { port, dir: Some(dir) };
        run_script(&["start", node.dir(), &port.to_string()]);
        node
    }

    fn dir(&self) -> &str {
        self.dir
            .as_ref()
            .expect("only a node of the test's own is killed")
            .to_str()
            .unwrap()
    }

    /// SIGKILLs the node and waits until it has exited.
    pub fn kill(&self) {
        run_script(&["kill", self.dir(), "KILL"]);
    }

    /// Starts the node again on its data and port; returns when it accepts connections.
    pub fn start(&self) {
        run_script(&["start", self.dir(), &self.port.to_string()]);
    }

    /// Runs `rabbitmqctl args` on the node; returns what it printed.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut all = vec!["ctl", self.dir()];
        all.extend_from_slice(args);
        run_script(&all)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        url(self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let Some(dir) = &self.dir else { return };
        let _ = Command::new("bash")
            .arg(ci_script("rabbitmq"))
            .args(["down", dir.to_str().unwrap()])
            .output();
        if std::thread::panicking() {
            eprintln!("rabbitmq node kept for inspection: {}", dir.display());
        } else {
            std::fs::remove_dir_all(dir).ok();
        }
    }
}

/// The guest URL for a local port.
pub fn url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// A port with the distribution port (+20000) free too. Both lie below Linux's ephemeral range
/// (32768-60999 by default): a port there can be taken by any outgoing connection between this check
/// and the node's start (a node failed with `dist_port_already_used` that way).
fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let p: u16 = rng.gen_range(10_000..12_700);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 20_000) {
            return p;
        }
    }
}

/// Consumer settings for tests: quick retries.
pub fn consumer_config(url: &str, queue: &str) -> RabbitConsumerConfig {
    RabbitConsumerConfig::new(url, queue)
        .backoff_base(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(500))
}

/// Runs a consumer runner with `handler` into `pool` until stopped; returns it and its counters.
pub fn run_consumer<H: Handler<sqlx::Postgres> + 'static>(
    cfg: RabbitConsumerConfig,
    pool: sqlx::PgPool,
    handler: H,
) -> (Running, Arc<ConsumerStats>) {
    let runner = RabbitConsumerRunner::new(cfg, pool, Inbox::new("effects"), handler).unwrap();
    let stats = runner.stats();
    (run_until_stopped(|stop| runner.run_until(stop)), stats)
}

/// A unique name.
pub fn name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub async fn connect(url: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(url, props).await
}

/// Declares `queue` as the consumer runner does (durable, single active consumer).
pub async fn declare_queue(url: &str, queue: &str) {
    let conn = connect(url).await.expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue, durable, args).await.expect("declare queue");
    let _ = conn.close(200, "done").await;
}

/// Messages in `queue` now (passive declare).
pub async fn queue_depth(url: &str, queue: &str) -> u32 {
    let conn = connect(url).await.expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch.queue_declare(queue, passive, FieldTable::default()).await.unwrap();
    let _ = conn.close(200, "done").await;
    q.message_count()
}

/// Consumes a queue in the background (manual acks after recording, reconnecting after a server
/// restart) and keeps everything it saw, in arrival order. Redeliveries show as duplicates.
pub struct Reader {
    seen: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    pub fn start(url: String, queue: String) -> Reader {
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let out = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = read_queue(&url, &queue, &out).await {
                    tracing::debug!(error = %e, "reader reconnects");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Reader { seen, task }
    }

    /// Everything so far once there are `at_least` or `timeout` passed.
    pub async fn read(&self, at_least: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if seen.len() >= at_least || start.elapsed() >= timeout {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_queue(url: &str, queue: &str, out: &Mutex<Vec<Received>>) -> lapin::Result<()> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue, "", BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        out.lock().unwrap().push(received(&d));
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// What a reader saw of one delivery.
pub fn received(d: &lapin::message::Delivery) -> Received {
    let mut headers = Vec::new();
    if let Some(t) = d.properties.headers() {
        for (k, v) in t.inner() {
            let v = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            headers.push((k.as_str().to_owned(), v));
        }
    }
    outbox_tests::consuming::received(headers, d.data.clone())
}

/// Effects per key in the order they were applied: each key's seqs must be 1, 2, 3... once each.
pub async fn check_effects(pool: &sqlx::PgPool, keys_expected: usize, per_key: i64) {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, seq FROM effects WHERE key IS NOT NULL ORDER BY n")
        .fetch_all(pool)
        .await
        .unwrap();
    let mut next: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for (k, s) in rows {
        let n = next.entry(k.clone()).or_insert(1);
        assert_eq!(
            s, *n,
            "key {k}: seq {s} applied where {n} was due (duplicate, gap or reordering)"
        );
        *n += 1;
    }
    assert_eq!(next.len(), keys_expected, "keys applied");
    for (k, n) in next {
        assert_eq!(n - 1, per_key, "key {k}: messages applied");
    }
}
