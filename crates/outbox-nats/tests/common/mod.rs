//! What the NATS tests share: the shared server of `.ci/nats`, dedicated servers a test can kill
//! and restart on their store, one stream per destination, and an independent reader.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use outbox::StoredMessage;
use outbox_nats::{async_nats, NatsConfig, NatsPublisher};
pub use outbox_tests::consuming::wait_effects;
use outbox_tests::consuming::{ci_script, run_ci_script, run_until_stopped};
use outbox_tests::embedded::Running;
use outbox_tests::publisher_suite::{stored, Received};

mod fixture;
// Not every test binary runs the conformance suite.
#[allow(unused_imports)]
pub use fixture::NatsFixture;

/// The shared server (`.ci/nats up`): `OUTBOX_TEST_NATS` or 127.0.0.1:4222.
pub fn shared_url() -> String {
    std::env::var("OUTBOX_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn run_script(args: &[&str], env: &[(String, String)]) {
    run_ci_script("nats", args, env);
}

/// A nats-server of one test's own (own port, own store), started with `.ci/nats start`.
pub struct Server {
    pub dir: String,
    pub port: u16,
    env: Vec<(String, String)>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(Vec::new()).await
    }

    /// A server that requires `user` and `password`.
    pub async fn start_with_auth(user: &str, password: &str) -> Server {
        Server::start_with(vec![
            ("OUTBOX_NATS_USER".into(), user.into()),
            ("OUTBOX_NATS_PASSWORD".into(), password.into()),
        ])
        .await
    }

    async fn start_with(env: Vec<(String, String)>) -> Server {
        // Below Linux's ephemeral range (32768-60999): the server is started again on this port
        // after a kill, and a port there can be taken meanwhile by any outgoing connection.
        let port = loop {
            let p = 13_000 + (uuid::Uuid::new_v4().as_u128() % 1_000) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                break p;
            }
        };
        let dir = format!(
            "{}/../../target/nats/test-{}",
            env!("CARGO_MANIFEST_DIR"),
            uuid::Uuid::new_v4().simple()
        );
        let s = Server { dir, port, env };
        s.up().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same store and port; returns when it accepts connections.
    pub async fn up(&self) {
        let (dir, port, env) = (self.dir.clone(), self.port.to_string(), self.env.clone());
        tokio::task::spawn_blocking(move || run_script(&["start", &dir, &port], &env))
            .await
            .unwrap();
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&self) {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || run_script(&["kill", &dir, "KILL"], &[]))
            .await
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(ci_script("nats"))
            .args(["kill", &self.dir, "KILL"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client for streams and reading (not the one under test).
pub async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .expect("connect")
}

/// A fresh destination: the topic `nt-<uuid>` and the stream `NT_<uuid>` taking `<topic>.*`.
pub async fn new_destination(client: &async_nats::Client, what: &str) -> (String, String) {
    let u = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("{what}-{u}");
    let stream = format!("S_{u}");
    let subject = format!("{topic}.*");
    let subjects = [subject.as_str()];
    with_retry(|| outbox_nats::ensure_stream(client, &stream, &subjects)).await;
    (topic, stream)
}

/// Retries a JetStream call for a while (a restarted server takes a moment to answer its API).
pub async fn with_retry<T, E: std::fmt::Display, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    outbox_tests::wait::until("a JetStream call", Duration::from_secs(30), || {
        let call = f();
        async move { call.await.map_err(|e| e.to_string()) }
    })
    .await
}

/// Every message of `stream` in stream order, read by sequence; waits until at least `at_least`
/// are stored or `timeout` passed.
pub async fn read_stream(
    client: &async_nats::Client,
    stream: &str,
    at_least: usize,
    timeout: Duration,
) -> Vec<Received> {
    let js = jetstream::new(client.clone());
    let start = Instant::now();
    let s = with_retry(|| js.get_stream(stream)).await;
    let last = loop {
        let info = with_retry(|| {
            let mut s = s.clone();
            async move { s.info().await.cloned() }
        })
        .await;
        if info.state.messages as usize >= at_least || start.elapsed() >= timeout {
            break info.state.last_sequence;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = with_retry(|| s.get_raw_message(seq)).await;
        let headers: Vec<(String, String)> = m
            .headers
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
            .collect();
        out.push(outbox_tests::consuming::received(headers, m.payload.to_vec()));
    }
    out
}

/// A publisher on `url` with test timeouts.
pub async fn publisher(url: &str) -> NatsPublisher {
    NatsPublisher::connect(publisher_config(url)).await.unwrap()
}

/// Publisher settings for `url` with test timeouts.
pub fn publisher_config(url: &str) -> NatsConfig {
    NatsConfig::default()
        .url(url)
        .ack_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
}

/// Consumer settings for tests: quick retries, short ack wait.
pub fn consumer_config(url: &str, stream: &str, durable: &str) -> outbox_nats::NatsConsumerConfig {
    outbox_nats::NatsConsumerConfig::new(stream, durable)
        .url(url)
        .ack_wait(Duration::from_secs(2))
        .backoff_base(Duration::from_millis(50))
        .backoff_max(Duration::from_millis(500))
}

/// Starts a consumer runner with `handler` into `pool`; returns it running and its counters.
pub async fn run_consumer<H>(
    cfg: outbox_nats::NatsConsumerConfig,
    pool: sqlx::PgPool,
    handler: H,
) -> (Running, Arc<outbox_nats::NatsConsumerStats>)
where
    H: outbox_inbox::Handler<sqlx::Postgres> + 'static,
{
    run_consumer_with(cfg, pool, outbox_inbox::Inbox::new("effects"), handler).await
}

/// [`run_consumer`] with an inbox of the test's own.
pub async fn run_consumer_with<H>(
    cfg: outbox_nats::NatsConsumerConfig,
    pool: sqlx::PgPool,
    inbox: outbox_inbox::Inbox,
    handler: H,
) -> (Running, Arc<outbox_nats::NatsConsumerStats>)
where
    H: outbox_inbox::Handler<sqlx::Postgres> + 'static,
{
    let runner = outbox_nats::NatsConsumerRunner::connect(cfg, pool, inbox, handler)
        .await
        .unwrap();
    let stats = runner.stats();
    (run_until_stopped(|stop| runner.run_until(stop)), stats)
}

/// One test's destination on the shared server: a topic with a stream of its own, a reader, a
/// publisher, and a fresh `effects` database for the consumer.
pub struct Setup {
    pub url: String,
    pub reader: async_nats::Client,
    pub topic: String,
    pub stream: String,
    pub publisher: NatsPublisher,
    pub effects: sqlx::PgPool,
}

impl Setup {
    /// A destination called `what-<uuid>` on the shared server.
    pub async fn shared(what: &str) -> Setup {
        Setup::on(shared_url(), what).await
    }

    /// A destination called `what-<uuid>` on the server at `url`.
    pub async fn on(url: String, what: &str) -> Setup {
        let reader = client(&url).await;
        let (topic, stream) = new_destination(&reader, what).await;
        let effects = outbox_tests::effects::effects_db().await;
        let publisher = publisher(&url).await;
        Setup {
            url,
            reader,
            topic,
            stream,
            publisher,
            effects,
        }
    }

    /// Publishes `rows`; every one must be acknowledged.
    pub async fn publish(&self, rows: &[StoredMessage]) {
        use outbox::Publisher;
        assert!(self.publisher.publish(rows).await.iter().all(Result::is_ok));
    }

    /// Publishes rows `range` of a run spread over `keys` keys (row `i` at position `i + 1`, key
    /// `k<i % keys>`, seq `i / keys + 1`) and returns them.
    pub async fn publish_keyed(&self, range: Range<i64>, keys: i64) -> Vec<StoredMessage> {
        let rows: Vec<_> = range
            .map(|i| {
                stored(
                    i + 1,
                    &self.topic,
                    Some(&format!("k{}", i % keys)),
                    Some(i / keys + 1),
                    vec![],
                )
            })
            .collect();
        self.publish(&rows).await;
        rows
    }

    /// Settings for the durable consumer `effects` of this stream ([`consumer_config`]).
    pub fn consumer_config(&self) -> outbox_nats::NatsConsumerConfig {
        consumer_config(&self.url, &self.stream, "effects")
    }

    /// Waits (up to 60 s) until every message of `expect` is applied, stops `consumer`, then checks
    /// the effects ([`check_effects`]).
    pub async fn stop_when_applied(&self, consumer: Running, expect: &HashSet<uuid::Uuid>) {
        wait_effects(&self.effects, expect.len() as i64, Duration::from_secs(60)).await;
        consumer.stop().await;
        check_effects(&self.effects, expect).await;
    }
}

/// The ids of `rows`.
pub fn ids<'a>(rows: impl IntoIterator<Item = &'a StoredMessage>) -> HashSet<uuid::Uuid> {
    rows.into_iter().map(|r| r.id).collect()
}

/// Checks the effects: each of `expect` applied exactly once, nothing else, and per key the
/// seqs applied in order 1, 2, 3...
pub async fn check_effects(pool: &sqlx::PgPool, expect: &std::collections::HashSet<uuid::Uuid>) {
    let rows: Vec<(uuid::Uuid, Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT message_id, key, seq FROM effects ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut high: std::collections::HashMap<String, i64> = Default::default();
    for (id, key, seq) in &rows {
        assert!(seen.insert(*id), "message {id} applied twice");
        assert!(expect.contains(id), "message {id} was never committed");
        if let (Some(k), Some(s)) = (key, seq) {
            let h = high.entry(k.clone()).or_insert(0);
            assert_eq!(*s, *h + 1, "key {k}: seq {s} applied after {h}");
            *h = *s;
        }
    }
    assert_eq!(seen.len(), expect.len(), "every committed message applied");
}
