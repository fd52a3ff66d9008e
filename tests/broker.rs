//! Talking to a broker that requires authentication: SASL/SCRAM-SHA-512 against a tansu broker of
//! the test's own (its own port, `sqlite://` storage so that the user survives the restart that
//! turns authentication on). Right password works, a wrong one fails at once without counting an
//! attempt or dead-lettering anything, and no secret appears in any log.
//!
//! TLS: tansu 0.6 accepts `--cert/--key` but never wraps its listener in TLS (tansu-broker 0.6.0,
//! broker.rs builds the acceptor and leaves it unused), so the TLS test puts a TLS terminator
//! (socat, with a certificate made by openssl for the test) in front of a tansu that advertises the
//! terminator's address: every client connection is TLS. Right CA works; a CA that did not sign the
//! broker's certificate fails at once as unavailable.
//!
//! Not tested here, because this machine has no broker that can do it:
//! - A broker killed and restarted with persistent storage: after a restart on `sqlite://` storage,
//!   tansu 0.6.0 answers every produce to a topic created before it with UNKNOWN_SERVER_ERROR (seen
//!   after SIGKILL and after SIGTERM, from the relay's idempotent producer, a new one, and a
//!   non-idempotent one), so nothing could be delivered after the restart by any client.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::{FailureKind, Message, Publisher, Store};
use outbox_kafka::KafkaPublisher;
use outbox_tests::conformance::{claim_all, take_all};
use outbox_tests::embedded::{drained, start, test_config, wait_for};
use outbox_tests::kafka::{check_delivery, create_topic_with, read_until_with, topic};
use rdkafka::config::ClientConfig;

const USER: &str = "outbox-relay";
const PASSWORD: &str = "s3cret-Pa55word";

/// A tansu broker process with sqlite storage in a directory of its own.
struct Broker {
    port: u16,
    /// The broker's working directory: its storage is `sqlite://tansu.db` in there (tansu reads
    /// the path after `sqlite://` as relative).
    dir: std::path::PathBuf,
    child: Option<Child>,
}

fn tansu_bin() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/tansu");
    let st = Command::new("bash")
        .arg(script)
        .arg("install")
        .status()
        .expect("run .ci/tansu");
    assert!(st.success(), ".ci/tansu install failed");
    let out = Command::new("bash").arg(script).arg("path").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Broker {
    fn new() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("outbox-tansu-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Broker { port, dir, child: None }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (on loopback only) and waits until it accepts connections.
    fn start(&mut self, authentication: bool) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        self.start_advertising(authentication, &url);
    }

    /// Starts the broker, telling clients to connect to `advertised` (a TLS terminator).
    fn start_advertising(&mut self, authentication: bool, advertised: &str) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tansu_bin());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            advertised,
        ])
        .args(["--storage-engine", "sqlite://tansu.db", "--silent"])
        .current_dir(&self.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if authentication {
            cmd.arg("--authentication");
        }
        self.child = Some(cmd.spawn().expect("start tansu"));
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no clean shutdown.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Creates a SCRAM-SHA-512 user through the broker (which must be running without
    /// authentication: tansu's user API needs an authenticated client otherwise).
    fn create_user(&self, user: &str, password: &str) {
        let out = Command::new(tansu_bin())
            .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--mechanism", "scram512", user, password])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn sasl(bootstrap: &str, password: &str) -> Vec<(String, String)> {
    [
        ("bootstrap.servers", bootstrap),
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", USER),
        ("sasl.password", password),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// Client settings for the test's own clients (topic creation, the independent reader).
fn client_of(settings: &[(String, String)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in settings {
        cfg.set(k, v);
    }
    cfg
}

/// Runs a relay with `settings` until the outbox is drained, then checks with an independent reader
/// (same settings) that every expected message arrived, in order, once.
async fn deliver_all(
    store: &outbox::postgres::PgStore,
    settings: &[(String, String)],
    t: &str,
    expect: &HashSet<uuid::Uuid>,
) {
    let publisher = KafkaPublisher::new(settings.to_vec()).unwrap();
    let relay = start(store.clone(), publisher, test_config().batch_size(50));
    drained(store, Duration::from_secs(60)).await;
    relay.stop().await;
    let seen = read_until_with(
        &client_of(settings),
        t,
        expect,
        Duration::from_secs(30),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(check_delivery(&seen, expect), 0);
}

/// Captures everything the code under test logs (tracing), to look for secrets.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn enqueue(pool: &sqlx::PgPool, t: &str, n: usize, tag: &str) -> HashSet<uuid::Uuid> {
    let mut tx = pool.begin().await.unwrap();
    let msgs: Vec<Message> = (0..n)
        .map(|i| Message::new(t, format!("{tag}{i}")).key(format!("k{}", i % 20)))
        .collect();
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    msgs.iter().map(|m| m.id()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sasl_scram_right_password_works_wrong_one_fails_fast_and_no_secret_is_logged() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    // Global: librdkafka's callbacks log from its own threads. Only this test installs one.
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber in this binary");

    // The user is created while the broker runs without authentication; the sqlite storage keeps
    // it when the broker comes back with authentication required.
    let mut broker = Broker::new();
    broker.start(false);
    broker.create_user(USER, PASSWORD);
    broker.kill();
    broker.start(true);
    let bootstrap = broker.bootstrap();
    let t = topic("sasl");
    create_topic_with(&client_of(&sasl(&bootstrap, PASSWORD)), &t, 2).await;

    // Wrong password: the publish fails at once as "unavailable"; nothing is dead-lettered and no
    // attempt is counted.
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let expect = enqueue(&pool, &t, 200, "m").await;
    let wrong = KafkaPublisher::new(sasl(&bootstrap, "not-the-password")).unwrap();
    let relay = start(store.clone(), wrong, test_config().batch_size(50).max_attempts(2));
    // Within 15 s, well inside message.timeout.ms (30 s): the batch failed at once as unavailable.
    wait_for("publish failed fast as unavailable", Duration::from_secs(15), || {
        let logs = logs.clone();
        async move {
            let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
            text.contains("broker authentication failed") && text.contains("broker unavailable; the lane backs off")
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.stop().await;
    assert_eq!(store.status().await.unwrap().pending, 200, "nothing marked");
    assert!(
        store.dead_letters(10).await.unwrap().is_empty(),
        "an auth failure dead-letters nothing"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT coalesce(max(attempts), 0)::int8 FROM outbox_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "an unavailable broker counts no attempt");

    // Right password: everything arrives, read back by an independent (authenticated) consumer.
    deliver_all(&store, &sasl(&bootstrap, PASSWORD), &t, &expect).await;

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(logs.contains("broker authentication failed"), "the failure is logged");
    for secret in [PASSWORD, "not-the-password"] {
        assert!(!logs.contains(secret), "a password appeared in the logs");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca.pem`) and, signed by it, a certificate for 127.0.0.1 (`<name>.pem`, `<name>.key`).
fn certificates(dir: &std::path::Path, name: &str) {
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.pem");
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(dir, &["genrsa", "-out", &ca_key, "2048"]);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &ca_key,
            "-days",
            "1",
            "-subj",
            "/CN=outbox test CA",
            "-out",
            &ca,
        ],
    );
    openssl(dir, &["genrsa", "-out", &key, "2048"]);
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", "/CN=127.0.0.1", "-out", &csr],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
}

/// socat terminating TLS on `port` (certificate `<name>.pem`) and forwarding to `to`.
struct Terminator(Child);

impl Terminator {
    fn start(dir: &std::path::Path, name: &str, port: u16, to: u16) -> Terminator {
        let listen =
            format!("OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={name}.pem,key={name}.key,verify=0");
        let child = Command::new("socat")
            .args([listen.as_str(), &format!("TCP:127.0.0.1:{to}")])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "socat did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Terminator(child)
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn tls(bootstrap: &str, ca: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("bootstrap.servers".to_owned(), bootstrap.to_owned()),
        ("security.protocol".to_owned(), "SSL".to_owned()),
        ("ssl.ca.location".to_owned(), ca.display().to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_right_ca_delivers_wrong_ca_fails_fast() {
    let dir = std::env::temp_dir().join(format!("outbox-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    certificates(&dir, "broker");
    certificates(&dir, "other");
    let tls_port = free_port();
    let mut broker = Broker::new();
    broker.start_advertising(false, &format!("tcp://127.0.0.1:{tls_port}"));
    let _terminator = Terminator::start(&dir, "broker", tls_port, broker.port);
    let bootstrap = format!("127.0.0.1:{tls_port}");
    let t = topic("tls");
    create_topic_with(&client_of(&tls(&bootstrap, &dir.join("broker-ca.pem"))), &t, 2).await;
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let expect = enqueue(&pool, &t, 200, "m").await;

    // A CA that did not sign the broker's certificate: the handshake fails and the publish returns
    // at once as unavailable (well inside message.timeout.ms, 30 s), so the relay would count no
    // attempt and dead-letter nothing.
    let wrong = KafkaPublisher::new(tls(&bootstrap, &dir.join("other-ca.pem"))).unwrap();
    let leases = take_all(&store, "tls-test").await;
    let rows = claim_all(&store, &leases).await;
    let out = tokio::time::timeout(Duration::from_secs(15), wrong.publish(&rows[..10]))
        .await
        .expect("a TLS failure fails the publish fast");
    assert!(
        out.iter()
            .all(|r| matches!(r, Err(e) if e.kind == FailureKind::Unavailable)),
        "{out:?}"
    );
    for l in &leases {
        store.release(l).await.unwrap();
    }

    // The right CA: everything arrives, read back over TLS by an independent consumer.
    deliver_all(&store, &tls(&bootstrap, &dir.join("broker-ca.pem")), &t, &expect).await;
    std::fs::remove_dir_all(&dir).ok();
}
