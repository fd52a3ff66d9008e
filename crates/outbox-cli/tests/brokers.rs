//! The daemon picks its broker from configuration: a `[nats]` section publishes to JetStream (the
//! shared nats-server of `.ci/nats`), a `[rabbitmq]` section to RabbitMQ (the shared node of
//! `.ci/rabbitmq`), two broker sections are refused at startup.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nats_url;
use outbox::{Message, StoreAdmin};
use outbox_nats::async_nats;
use outbox_tests::daemon::db_url;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn config_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("outbox-brokers-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A fresh database with 60 keyed messages (6 keys) for `topic`.
async fn sixty_messages(topic: &str) -> sqlx::PgPool {
    let pool = outbox_tests::db::fresh_pg().await;
    let mut tx = pool.begin().await.unwrap();
    let msgs: Vec<Message> = (0..60)
        .map(|i| Message::new(topic, format!("m{i}")).key(format!("k{}", i % 6)))
        .collect();
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    pool
}

/// A daemon's process, killed when dropped: a test that fails before it stops the daemon leaves
/// no relay running (and holding database connections) behind it.
struct Daemon(std::process::Child);

impl std::ops::Deref for Daemon {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `outbox-relay run` on `pool` with the config `text` and one environment variable.
fn run_daemon(pool: &sqlx::PgPool, text: &str, env: (&str, &str)) -> (Daemon, std::path::PathBuf) {
    let cfg = config_file(text);
    let relay = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--database-url", &db_url(pool)])
        .args(["--poll-interval-ms", "100", "--admin-listen", &free_addr(), "run"])
        .env(env.0, env.1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Daemon(relay), cfg)
}

/// SIGTERM, then a clean exit.
fn terminate(mut relay: Daemon, cfg: std::path::PathBuf) {
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(relay.wait().unwrap().success(), "SIGTERM ends the relay with 0");
    std::fs::remove_file(cfg).ok();
}

/// Runs the daemon with the config `text` and one environment variable over a fresh database of
/// 60 messages for `topic` until nothing is pending and `count` (what the broker holds, named `what`
/// in the failure; up to 60 s) has reached them, stops it with SIGTERM, and checks nothing was
/// dead-lettered. Returns the database and the count, which a message sent twice would raise
/// above 60.
async fn relay_sixty<F, Fut>(topic: &str, text: &str, env: (&str, &str), what: &str, count: F) -> (sqlx::PgPool, u64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let pool = sixty_messages(topic).await;
    let (relay, cfg) = run_daemon(&pool, text, env);
    let n = sixty_relayed(&pool, what, count).await;
    terminate(relay, cfg);
    (pool, n)
}

/// Waits (up to 60 s) until nothing is pending in `pool` and `count` (what the broker holds,
/// named `what` in the failure) has reached 60; checks nothing was dead-lettered. Returns the count.
async fn sixty_relayed<F, Fut>(pool: &sqlx::PgPool, what: &str, mut count: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let store = outbox::postgres::PgStore::new(pool.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let n = loop {
        let pending = store.status().await.unwrap().pending;
        let n = count().await;
        if pending == 0 && n >= 60 {
            break n;
        }
        assert!(Instant::now() < deadline, "pending {pending}, {what} {n} after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(store.dead_letters(10).await.unwrap().is_empty());
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_section_publishes_to_jetstream() {
    let client = async_nats::connect(nats_url())
        .await
        .expect("the shared nats-server (.ci/nats up)");
    let u = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("daemon-{u}");
    let stream = format!("DAEMON_{u}");
    let subject = format!("{topic}.*");
    outbox_nats::ensure_stream(&client, &stream, &[subject.as_str()])
        .await
        .unwrap();

    let js = async_nats::jetstream::new(client);
    let config = "[nats]\nack_timeout_ms = 5000\n";
    let (pool, stored) = relay_sixty(&topic, config, ("OUTBOX_NATS_URL", &nats_url()), "stored", || async {
        js.get_stream(&stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    })
    .await;
    assert_eq!(stored, 60, "every row once on the stream (Nats-Msg-Id drops re-sends)");
    // The stream the relay filled passes `verify`.
    let out = Command::new(BIN)
        .args(["--database-url", &db_url(&pool), "verify", "--topic", &topic, "--json"])
        .env("OUTBOX_NATS_URL", nats_url())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("\"records\": 60") && report.contains("\"missing\": 0"),
        "{report}"
    );
}

fn rabbitmq_url() -> String {
    std::env::var("OUTBOX_TEST_RABBITMQ").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let conn = lapin::Connection::connect(&rabbitmq_url(), props)
        .await
        .expect("the shared RabbitMQ node (.ci/rabbitmq up)");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// A durable queue of its own on the shared node, with the connection and channel that declared
/// it. The default exchange routes by queue name: the topic is the queue.
async fn durable_queue(prefix: &str) -> (lapin::Connection, lapin::Channel, String) {
    let queue = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let (conn, ch) = amqp_channel().await;
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(&queue, durable, lapin::types::FieldTable::default())
        .await
        .unwrap();
    (conn, ch, queue)
}

/// How many messages `queue` holds.
async fn queued(ch: &lapin::Channel, queue: &str) -> u64 {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = ch
        .queue_declare(queue, passive, lapin::types::FieldTable::default())
        .await;
    u64::from(declared.unwrap().message_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_section_publishes_with_confirms() {
    let (conn, ch, topic) = durable_queue("daemon").await;
    let config = "[rabbitmq]\nconfirm_timeout_ms = 5000\n";
    let (_, queued) = relay_sixty(
        &topic,
        config,
        ("OUTBOX_RABBITMQ_URL", &rabbitmq_url()),
        "queued",
        || queued(&ch, &topic),
    )
    .await;
    let _ = ch.queue_delete(&topic, Default::default()).await;
    let _ = conn.close(200, "done").await;
    assert_eq!(
        queued, 60,
        "every row once in the queue, each confirmed before it was marked"
    );
}

/// A RabbitMQ node that cannot be reached when the daemon starts (restarted beside it): the
/// daemon exited 1 at once, where an unreachable database or NATS server is waited for, and a
/// crash-looping pod serves no `/healthz`. It now starts, and publishes once the node answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_node_unreachable_at_start_is_waited_for() {
    let (conn, ch, topic) = durable_queue("daemon-late").await;
    // Nothing listens there yet.
    let addr = free_addr();
    let url = format!("amqp://guest:guest@{addr}/%2f");
    let pool = sixty_messages(&topic).await;
    let config = "[rabbitmq]\nconfirm_timeout_ms = 5000\nconnect_timeout_ms = 2000\n";
    let (mut relay, cfg) = run_daemon(&pool, config, ("OUTBOX_RABBITMQ_URL", &url));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the daemon exited while the node could not be reached"
    );
    // The node comes: a forwarder on that address to the shared node.
    let node = rabbitmq_url();
    let node = node
        .split_once('@')
        .map_or("127.0.0.1:5672", |(_, rest)| rest.split('/').next().unwrap())
        .to_owned();
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let forward = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let node = node.clone();
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(&node).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    let queued = sixty_relayed(&pool, "queued", || queued(&ch, &topic)).await;
    terminate(relay, cfg);
    forward.abort();
    let _ = ch.queue_delete(&topic, Default::default()).await;
    let _ = conn.close(200, "done").await;
    assert_eq!(queued, 60, "every row once in the queue");
}

/// The first connection to the broker was not raced against the stop signal: a SIGTERM while a
/// broker that accepted the connection never answered waited out the whole connect timeout, and
/// the daemon then exited with an error. It now stops at once, with 0.
#[tokio::test]
async fn a_sigterm_while_the_broker_does_not_answer_at_start_stops_the_daemon_at_once() {
    // Accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || silent.incoming().take(4).filter_map(Result::ok).collect::<Vec<_>>());
    let pool = outbox_tests::db::fresh_pg().await;
    let config = "[rabbitmq]\nconnect_timeout_ms = 60000\n";
    let (mut relay, cfg) = run_daemon(&pool, config, ("OUTBOX_RABBITMQ_URL", &url));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    let status =
        outbox_tests::daemon::exit_within(&mut relay, Duration::from_secs(10), "SIGTERM while connecting").await;
    std::fs::remove_file(cfg).ok();
    assert!(
        status.success(),
        "SIGTERM while connecting ends the daemon with 0: {status:?}"
    );
    drop(held);
}

#[test]
fn two_broker_sections_are_refused_at_startup() {
    let cfg = config_file("[nats]\n[rabbitmq]\nexchange = \"orders\"\n");
    let out = Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
        ])
        .arg("run")
        .output()
        .unwrap();
    std::fs::remove_file(cfg).ok();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("more than one broker configured (rabbitmq, nats)"),
        "{text}"
    );
}
