//! Talking to a broker that requires authentication and authorization, on the shared Apache Kafka
//! broker's own listeners (`.ci/kafka`): SASL/SCRAM-SHA-512 (user made at format), TLS (a PEM
//! certificate made by openssl and signed by the test CA), and ACLs (StandardAuthorizer).
//! Right credentials deliver everything; a wrong password or an untrusted CA fails at once without
//! counting an attempt or dead-lettering anything, and no secret appears in any log; a topic the
//! relay's principal may not write is dead-lettered while other topics keep flowing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::{FailureKind, Message, Publisher, Store, StoreAdmin};
use outbox_kafka::KafkaPublisher;
use outbox_tests::conformance::{claim_all, take_all};
use outbox_tests::embedded::{drained, start, test_config, wait_for};
use outbox_tests::kafka::{
    check_delivery, create_topic, create_topic_with, read_until, topic, Cluster, SCRAM_PASSWORD, SCRAM_USER,
};
use rdkafka::config::ClientConfig;

fn sasl(bootstrap: &str, password: &str) -> Vec<(String, String)> {
    [
        ("bootstrap.servers", bootstrap),
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", SCRAM_USER),
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
    let seen = read_until(
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
    let msgs: Vec<Message> = (0..n)
        .map(|i| Message::new(t, format!("{tag}{i}")).key(format!("{tag}k{}", i % 20)))
        .collect();
    outbox_tests::db::commit_batch(pool, &msgs).await;
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

    let bootstrap = Cluster::shared().sasl_bootstrap();
    let t = topic("sasl");
    create_topic_with(&client_of(&sasl(&bootstrap, SCRAM_PASSWORD)), &t, 2).await;

    // Wrong password: the publish fails at once as "unavailable"; nothing is dead-lettered and no
    // attempt is counted.
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
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
    let attempts: i64 =
        outbox_tests::db::scalar(&pool, "SELECT coalesce(max(attempts), 0)::int8 FROM outbox_messages").await;
    assert_eq!(attempts, 0, "an unavailable broker counts no attempt");

    // Right password: everything arrives, read back by an independent (authenticated) consumer.
    deliver_all(&store, &sasl(&bootstrap, SCRAM_PASSWORD), &t, &expect).await;

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(logs.contains("broker authentication failed"), "the failure is logged");
    for secret in [SCRAM_PASSWORD, "not-the-password"] {
        assert!(!logs.contains(secret), "a password appeared in the logs");
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
    let broker = Cluster::shared();
    let bootstrap = broker.ssl_bootstrap();
    let t = topic("tls");
    create_topic_with(&client_of(&tls(&bootstrap, &broker.ca())), &t, 2).await;
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let expect = enqueue(&pool, &t, 200, "m").await;

    // A CA that did not sign the broker's certificate: the handshake fails and the publish returns
    // at once as unavailable (well inside message.timeout.ms, 30 s), so the relay would count no
    // attempt and dead-letter nothing.
    let wrong = KafkaPublisher::new(tls(&bootstrap, &broker.other_ca())).unwrap();
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
    deliver_all(&store, &tls(&bootstrap, &broker.ca()), &t, &expect).await;
}

/// Waits until the broker refuses `principal`'s writes to `t` (ACLs apply asynchronously).
async fn wait_denied(settings: &[(String, String)], t: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = client_of(settings).set("message.timeout.ms", "5000").create().unwrap();
    wait_for("the ACL applies", Duration::from_secs(30), || {
        let producer = producer.clone();
        async move {
            let rec = FutureRecord::<str, str>::to(t).payload("probe");
            matches!(
                producer.send(rec, Duration::from_secs(5)).await,
                Err((e, _)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed)
            )
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_the_relay_may_not_write_is_dead_lettered_while_other_topics_flow() {
    let broker = Cluster::shared();
    let denied = topic("acl-denied");
    let allowed = topic("acl-allowed");
    create_topic(&broker.bootstrap(), &denied, 2).await;
    create_topic(&broker.bootstrap(), &allowed, 2).await;
    let principal = format!("User:{SCRAM_USER}");
    broker.admin(
        "org.apache.kafka.tools.AclCommand",
        &[
            "--add",
            "--deny-principal",
            &principal,
            "--operation",
            "Write",
            "--topic",
            &denied,
        ],
    );
    let settings = sasl(&broker.sasl_bootstrap(), SCRAM_PASSWORD);
    wait_denied(&settings, &denied).await;

    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let no = enqueue(&pool, &denied, 6, "d").await;
    let yes = enqueue(&pool, &allowed, 300, "a").await;
    let publisher = KafkaPublisher::new(settings.clone()).unwrap();
    let relay = start(store.clone(), publisher, test_config().batch_size(50).max_attempts(5));
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;

    let dl = store.dead_letters(10).await.unwrap();
    let dead: HashSet<uuid::Uuid> = dl.iter().map(|d| d.id).collect();
    assert_eq!(dead, no, "exactly the denied topic's messages are dead letters");
    for d in &dl {
        // Permanent at once: not dead-lettered for running out of attempts. (A message queued behind
        // a failed one of its key is held back once, so it may show 2 attempts.)
        assert!(d.error.contains("TopicAuthorizationFailed"), "{}", d.error);
        assert!(d.attempts <= 2, "{d:?}");
    }
    let seen = read_until(
        &client_of(&settings),
        &allowed,
        &yes,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(check_delivery(&seen, &yes), 0);
}
