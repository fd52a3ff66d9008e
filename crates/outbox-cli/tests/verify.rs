//! `outbox-relay verify` against the real broker and PostgreSQL: a topic the relay filled passes; a
//! topic written by hand with a record left out, one doubled and a pair swapped fails with exactly
//! those counts; a seq still pending is not lost; a NATS JetStream stream is audited the same way.

mod common;

use std::process::Command;
use std::time::Duration;

use common::nats_url;
use outbox::Message;
use outbox_nats::async_nats;
use outbox_tests::daemon::{db_url, wait_pending_below, RelayArgs};
use outbox_tests::kafka::{client, create_topic, topic, PgTopic};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// Runs `verify --json` on `topic` against the Kafka broker; returns the exit code and the report.
fn verify(url: &str, bootstrap: &str, topic: &str) -> (i32, Value) {
    let kafka = format!("bootstrap.servers={bootstrap}");
    verify_with(&["--database-url", url, "--kafka", &kafka], &[], topic)
}

/// Runs `verify --json` on `topic` with these flags before it and this environment.
fn verify_with(flags: &[&str], env: &[(&str, &str)], topic: &str) -> (i32, Value) {
    let out = Command::new(BIN)
        .args(flags)
        .args(["verify", "--topic", topic, "--json"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outbox-relay verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), report)
}

/// `rows` as a broken relay would have written them: k0's seq 3 lost, k1's seq 2 twice, k2's seq 4
/// before its seq 3.
fn broken(rows: &[Row]) -> Vec<Row> {
    let mut written = Vec::new();
    for r in rows {
        match (r.key.as_str(), r.seq) {
            ("k0", 3) => {}
            ("k1", 2) => {
                written.push(r.clone());
                written.push(r.clone());
            }
            ("k2", 4) => {
                let three = written.pop().expect("k2 seq 3");
                written.push(r.clone());
                written.push(three);
            }
            _ => written.push(r.clone()),
        }
    }
    written
}

/// Enqueues `n` messages per key on `keys` (`k0`, `k1`...) plus `unkeyed` unkeyed ones.
async fn enqueue(pool: &sqlx::PgPool, t: &str, keys: usize, n: usize, unkeyed: usize) {
    let mut tx = pool.begin().await.unwrap();
    let mut msgs = Vec::new();
    for i in 0..n {
        for k in 0..keys {
            msgs.push(Message::new(t, format!("{k}/{i}")).key(format!("k{k}")));
        }
    }
    msgs.extend((0..unkeyed).map(|i| Message::new(t, format!("u{i}"))));
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
}

/// A pending row taken over by the test, to be produced as the relay would.
#[derive(Clone)]
struct Row {
    id: uuid::Uuid,
    key: String,
    seq: i64,
}

/// Takes the outbox rows of `keys` out of the table (so they count as published), ordered by key
/// and seq. Rows for which `keep` says false stay pending.
async fn take_rows(pool: &sqlx::PgPool, keep: impl Fn(&str, i64) -> bool) -> Vec<Row> {
    let rows: Vec<(uuid::Uuid, String, i64)> =
        sqlx::query_as("SELECT id, key, seq FROM outbox_messages WHERE key IS NOT NULL ORDER BY key, seq")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut taken = Vec::new();
    for (id, key, seq) in rows {
        if keep(&key, seq) {
            sqlx::query("DELETE FROM outbox_messages WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .unwrap();
            taken.push(Row { id, key, seq });
        }
    }
    taken
}

/// Produces `rows` in this order, with the relay's headers and Kafka key, one at a time.
async fn produce(bootstrap: &str, t: &str, source: &str, rows: &[Row]) {
    let producer: FutureProducer = client(bootstrap).create().expect("producer");
    for r in rows {
        let (id, seq) = (r.id.to_string(), r.seq.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: outbox::HEADER_ID,
                value: Some(&id),
            })
            .insert(Header {
                key: outbox::HEADER_KEY,
                value: Some(&r.key),
            })
            .insert(Header {
                key: outbox::HEADER_SEQ,
                value: Some(&seq),
            })
            .insert(Header {
                key: outbox::HEADER_SOURCE,
                value: Some(source),
            });
        let record = FutureRecord::to(t).key(&r.key).payload("p").headers(headers);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

async fn source(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SELECT id FROM outbox_source")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The report's entry for `key`.
fn problem<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == key)
        .unwrap_or_else(|| panic!("no problem reported for {key}: {report:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_relay_filled_passes() {
    let (bootstrap, t, pool, _) = PgTopic::new("verify-clean", 3).await.into_parts();
    enqueue(&pool, &t, 20, 15, 40).await;
    // Published rows kept: the unkeyed ids are checked too.
    let config = std::env::temp_dir().join(format!("verify-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&config, "[relay]\nkeep_published = true\n").unwrap();
    let mut relay = RelayArgs::new(BIN, &db_url(&pool), &bootstrap, 50)
        .args(["--config", config.to_str().unwrap()])
        .spawn();
    let store = outbox::postgres::PgStore::new(pool.clone());
    wait_pending_below(&store, 1, Duration::from_secs(60)).await;
    relay.terminate();
    std::fs::remove_file(&config).ok();

    let (code, report) = verify(&db_url(&pool), &bootstrap, &t);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["records"], 340, "{report:#}");
    assert_eq!(report["keyed"], 300);
    assert_eq!(report["keys"], 20);
    assert_eq!(report["unkeyed"], 40);
    assert_eq!(report["unkeyed_checked"], 40);
    assert_eq!(report["unkeyed_missing"], 0);
    assert_eq!(report["missing"], 0);
    assert_eq!(report["reordered"], 0);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["source"], source(&pool).await.as_str());
    assert_eq!(report["topics"][0]["partitions"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_duplicated_and_swapped_records_fail_with_the_right_counts() {
    let (bootstrap, t, pool, _) = PgTopic::new("verify-broken", 2).await.into_parts();
    enqueue(&pool, &t, 4, 5, 0).await;
    let rows = take_rows(&pool, |_, _| true).await;
    produce(&bootstrap, &t, &source(&pool).await, &broken(&rows)).await;

    let (code, report) = verify(&db_url(&pool), &bootstrap, &t);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["records"], 20, "{report:#}");
    assert_eq!(report["missing"], 1, "{report:#}");
    assert_eq!(report["duplicates"], 1, "{report:#}");
    assert_eq!(report["reordered"], 1, "{report:#}");
    assert_eq!(
        report["problems"].as_array().unwrap().len(),
        3,
        "k3 is clean: {report:#}"
    );
    let k0 = problem(&report, "k0");
    assert_eq!(k0["missing"], 1);
    assert_eq!(k0["missing_seqs"], serde_json::json!([[3, 3]]));
    let k1 = problem(&report, "k1");
    assert_eq!((k1["duplicates"].clone(), k1["missing"].clone()), (1.into(), 0.into()));
    assert_eq!(k1["duplicate_seqs"], serde_json::json!([2]));
    let k2 = problem(&report, "k2");
    assert_eq!((k2["reordered"].clone(), k2["missing"].clone()), (1.into(), 0.into()));
    assert_eq!(k2["reordered_seqs"], serde_json::json!([3]));

    // The summary for a person says the same.
    let out = Command::new(BIN)
        .args(["--database-url", &db_url(&pool)])
        .args(["--kafka", &format!("bootstrap.servers={bootstrap}")])
        .args(["verify", "--topic", &t])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let summary = String::from_utf8_lossy(&out.stdout);
    println!("{summary}");
    for line in [
        "missing:    1",
        "reordered:  1",
        "duplicates: 1",
        "key \"k0\": 1 missing (3)",
        "key \"k1\": 1 duplicated (2)",
        "key \"k2\": 1 reordered (3)",
        "FAILED",
    ] {
        assert!(summary.contains(line), "{line:?} not in:\n{summary}");
    }

    // Duplicates alone do not fail: the same records without the loss and the swap pass.
    let clean = topic("verify-duplicates");
    create_topic(&bootstrap, &clean, 1).await;
    let mut doubled = rows.clone();
    doubled.insert(1, rows[0].clone());
    produce(&bootstrap, &clean, &source(&pool).await, &doubled).await;
    let (code, report) = verify(&db_url(&pool), &bootstrap, &clean);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["duplicates"], 1, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_still_pending_is_not_missing() {
    let (bootstrap, t, pool, _) = PgTopic::new("verify-pending", 1).await.into_parts();
    enqueue(&pool, &t, 2, 5, 0).await;
    // k0: seq 3 waits in the outbox (e.g. in backoff) while 4 and 5 went out; k1: 5 not yet sent.
    let rows = take_rows(&pool, |k, s| !matches!((k, s), ("k0", 3) | ("k1", 5))).await;
    produce(&bootstrap, &t, &source(&pool).await, &rows).await;
    let (code, report) = verify(&db_url(&pool), &bootstrap, &t);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["records"], 8);
    assert_eq!(report["missing"], 0, "{report:#}");

    // Once the row is gone without being published (a discarded dead letter), it is lost.
    outbox_tests::db::exec(&pool, "DELETE FROM outbox_messages WHERE key = 'k0'").await;
    let (code, report) = verify(&db_url(&pool), &bootstrap, &t);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(problem(&report, "k0")["missing_seqs"], serde_json::json!([[3, 3]]));
}

#[test]
fn usage_and_connection_errors_exit_2() {
    let out = Command::new(BIN)
        .args(["--database-url", "postgres://postgres@127.0.0.1:5432/postgres"])
        .args(["verify", "--topic", "t"])
        .env_remove("OUTBOX_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no broker configured");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no broker configured"));
    let out = Command::new(BIN)
        .args(["--database-url", "postgres://postgres@127.0.0.1:1/none"])
        .args(["--kafka", "bootstrap.servers=127.0.0.1:19092"])
        .args(["verify", "--topic", "t"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "database unreachable");
    let out = Command::new(BIN).args(["verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--topic is required");
}

/// Runs `verify --json` against NATS JetStream on `topic`.
fn verify_nats(url: &str, topic: &str) -> (i32, Value) {
    verify_with(&["--database-url", url], &[("OUTBOX_NATS_URL", &nats_url())], topic)
}

/// Publishes `rows` in this order to JetStream as the relay would (subject `<topic>.<key token>`,
/// the outbox headers), each acked before the next.
async fn produce_nats(js: &async_nats::jetstream::Context, t: &str, source: &str, rows: &[Row]) {
    for r in rows {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(outbox::HEADER_ID, r.id.to_string().as_str());
        headers.insert(outbox::HEADER_KEY, r.key.as_str());
        headers.insert(outbox::HEADER_SEQ, r.seq.to_string().as_str());
        headers.insert(outbox::HEADER_SOURCE, source);
        let subject = format!("{t}.{}", outbox_nats::key_token(&r.key));
        let ack = js.publish_with_headers(subject, headers, "p".into()).await.unwrap();
        ack.await.expect("JetStream ack");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_stream_is_audited_like_a_topic() {
    let client = async_nats::connect(nats_url())
        .await
        .expect("the shared nats-server (.ci/nats up)");
    let js = async_nats::jetstream::new(client.clone());
    let u = uuid::Uuid::new_v4().simple().to_string();
    let (clean, broken_topic) = (format!("verify-clean-{u}"), format!("verify-broken-{u}"));
    for t in [&clean, &broken_topic] {
        let stream = t.replace('-', "_").to_uppercase();
        outbox_nats::ensure_stream(&client, &stream, &[format!("{t}.>").as_str()])
            .await
            .unwrap();
    }

    // Clean: every row once, in order.
    let pool = outbox_tests::db::fresh_pg().await;
    enqueue(&pool, &clean, 3, 4, 0).await;
    let rows = take_rows(&pool, |_, _| true).await;
    produce_nats(&js, &clean, &source(&pool).await, &rows).await;
    let (code, report) = verify_nats(&db_url(&pool), &clean);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        (report["records"].clone(), report["missing"].clone()),
        (12.into(), 0.into()),
        "{report:#}"
    );
    // Several servers in the URL, as the relay takes it: verify read them with a client of its
    // own, which took the list for one invalid address (and a URL's credentials for none).
    let servers = format!("{0},{0}", nats_url());
    let (code, report) = verify_with(
        &["--database-url", &db_url(&pool)],
        &[("OUTBOX_NATS_URL", &servers)],
        &clean,
    );
    assert_eq!((code, report["records"].clone()), (0, 12.into()), "{report:#}");

    let pool = outbox_tests::db::fresh_pg().await;
    enqueue(&pool, &broken_topic, 4, 5, 0).await;
    let rows = take_rows(&pool, |_, _| true).await;
    produce_nats(&js, &broken_topic, &source(&pool).await, &broken(&rows)).await;
    let (code, report) = verify_nats(&db_url(&pool), &broken_topic);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["records"], 20, "{report:#}");
    assert_eq!(report["missing"], 1, "{report:#}");
    assert_eq!(report["duplicates"], 1, "{report:#}");
    assert_eq!(report["reordered"], 1, "{report:#}");
    assert_eq!(problem(&report, "k0")["missing_seqs"], serde_json::json!([[3, 3]]));
    for t in [&clean, &broken_topic] {
        let _ = js.delete_stream(t.replace('-', "_").to_uppercase()).await;
    }
}

#[test]
fn verify_refuses_a_rabbitmq_broker_with_a_reason() {
    let out = Command::new(BIN)
        .args([
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
            "verify",
            "--topic",
            "t",
        ])
        .env("OUTBOX_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("RabbitMQ queue cannot be read without consuming it"),
        "{err}"
    );
}

/// A broker that goes down in the middle of the read: every reconnect's failure came back through
/// the consumer's poll and counted as progress, so `verify` went on for ever instead of giving up
/// after a minute without a record (exit 2, the broker's fault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_goes_down_mid_read_ends_verify_with_exit_2() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let pool = outbox_tests::db::fresh_pg().await;
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    mock.create_topic("failing", 1, 1).unwrap();
    let producer: FutureProducer = client(&bootstrap).create().unwrap();
    producer
        .send(
            FutureRecord::<(), _>::to("failing").payload("x"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
    );
    let url = db_url(&pool);
    let mut verify = Command::new(BIN)
        .args([
            "--database-url",
            &url,
            "--kafka",
            &format!("bootstrap.servers={bootstrap}"),
        ])
        .args(["verify", "--topic", "failing", "--json"])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The fetches fail (the read waits, and says nothing), then the broker goes away.
    tokio::time::sleep(Duration::from_secs(5)).await;
    mock.broker_down(1).unwrap();
    let status =
        outbox_tests::daemon::exit_within(&mut verify, Duration::from_secs(120), "verify with its broker down").await;
    assert_eq!(status.code(), Some(2), "{status:?}");
}
