//! The `outbox-relay` binary as an operator runs it: SIGTERM drains and exits 0; SIGKILL mid-batch
//! and a restart lose nothing (duplicates bounded by one batch per lane); CLI errors are clear.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ids_of;
use outbox::{Message, Store, StoreAdmin};
use outbox_tests::daemon::{db_url, enqueue_all, pending, wait_pending_below, RelayArgs, RelayProcess};
use outbox_tests::kafka::{broker, check_delivery, read_all, PgTopic};
use outbox_tests::wait::until;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn spawn_relay(url: &str, bootstrap: &str, batch: usize) -> RelayProcess {
    RelayArgs::new(BIN, url, bootstrap, batch).spawn()
}

#[path = "daemon/backends.rs"]
mod backends;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_releases_leases_and_exits_zero() {
    let (bootstrap, t, pool, store) = PgTopic::new("daemon-term", 4).await.into_parts();
    let ids = enqueue_all(&pool, &t, 20_000, 200).await;
    let mut relay = spawn_relay(&db_url(&pool), &bootstrap, 200);
    wait_pending_below(&store, 19_000, Duration::from_secs(60)).await;
    relay.signal("-TERM");
    let st = relay.wait_exit(Duration::from_secs(40));
    assert_eq!(st.code(), Some(0), "SIGTERM must exit 0");
    let status = store.status().await.unwrap();
    assert!(
        status.lanes.iter().all(|l| l.owner.is_none()),
        "leases released on shutdown"
    );
    assert_eq!(store.live_owners().await.unwrap(), 0, "deregistered");
    // Every row that was marked published really is on the topic; the rest is still pending.
    let left: i64 = status.pending;
    let marked = ids.len() as i64 - left;
    assert!(marked > 0);
    let remaining = ids_of(&pool, "SELECT id FROM outbox_messages").await;
    let published: HashSet<_> = ids.difference(&remaining).copied().collect();
    let seen = read_all(&bootstrap, &t, &published).await;
    let seen_ids: HashSet<_> = seen.iter().map(|s| s.id).collect();
    assert!(
        published.is_subset(&seen_ids),
        "a row was marked published but is not on the topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_restart_loses_nothing() {
    let (bootstrap, t, pool, store) = PgTopic::new("daemon-kill", 4).await.into_parts();
    let ids = enqueue_all(&pool, &t, 20_000, 200).await;
    let batch = 200;
    let mut relay = spawn_relay(&db_url(&pool), &bootstrap, batch);
    wait_pending_below(&store, 15_000, Duration::from_secs(60)).await;
    relay.kill();
    let left_at_kill = pending(&store).await;
    assert!(left_at_kill > 0, "killed before the end");
    // Restart: it takes the lanes over once the dead relay's leases expire.
    let mut relay = spawn_relay(&db_url(&pool), &bootstrap, batch);
    wait_pending_below(&store, 1, Duration::from_secs(120)).await;
    relay.signal("-TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(40)).code(), Some(0));

    let seen = read_all(&bootstrap, &t, &ids).await;
    let dups = check_delivery(&seen, &ids);
    let bound = batch * outbox::LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
    eprintln!("sigkill: {dups} duplicates after the restart (bound {bound})");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["--database-url", "redis://x", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported database URL"), "{err}");

    let cfg = std::env::temp_dir().join(format!("relay-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &cfg,
        "database_url = 'postgres://u:hunter2@127.0.0.1:1/x'\n[relay]\nbatchsize = 3\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("batchsize"), "{err}");
    assert!(!err.contains("hunter2"), "a secret leaked: {err}");

    // Unreachable database: fails within the connect timeout, password not printed.
    std::fs::write(&cfg, "database_url = 'postgres://u:hunter2@127.0.0.1:1/x'\n").unwrap();
    let start = Instant::now();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(start.elapsed() < Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("hunter2"), "a secret leaked: {err}");
    std::fs::remove_file(cfg).ok();
}

#[tokio::test]
async fn status_and_dead_letter_commands() {
    let pool = outbox_tests::db::fresh_pg().await;
    let url = db_url(&pool);
    let store = outbox::postgres::PgStore::new(pool.clone());
    let mut tx = pool.begin().await.unwrap();
    let m = Message::new("t", "x").key("k");
    let e = outbox::enqueue(&mut tx, &m).await.unwrap();
    // A second dead letter, later, of another key of the lane.
    let other = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| outbox::lane_of(Some(k), uuid::Uuid::nil(), outbox::LANES) == e.lane)
        .unwrap();
    outbox::enqueue(&mut tx, &Message::new("t", "y").key(other))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let leases = store.acquire("op-test", 64, Duration::from_secs(60)).await.unwrap();
    let lease = leases.iter().find(|l| l.lane == e.lane).unwrap();
    for row in store.claim(lease, 2, &[]).await.unwrap() {
        store
            .dead_letter(lease, row.pos, "MessageSizeTooLarge", true)
            .await
            .unwrap();
    }

    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--database-url", &url])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let status = run(&["status"]);
    assert!(status.contains("pending:       0"), "{status}");
    assert!(status.contains("dead letters:  2"), "{status}");
    assert!(status.contains("op-test"), "{status}");
    let list = run(&["dead-letters", "list"]);
    assert!(list.contains(&m.id().to_string()) && list.contains("PARKED"), "{list}");
    // A list cut by --limit says so; --limit 0 printed "no dead letters" beside two.
    let first = run(&["dead-letters", "list", "--limit", "1"]);
    assert!(
        first.contains(&m.id().to_string()) && first.contains("the oldest 1 of 2 dead letters"),
        "{first}"
    );
    let zero = Command::new(BIN)
        .args(["--database-url", &url, "dead-letters", "list", "--limit", "0"])
        .output()
        .unwrap();
    assert!(!zero.status.success(), "{}", String::from_utf8_lossy(&zero.stdout));
    run(&["dead-letters", "retry", &m.id().to_string()]);
    assert_eq!(store.status().await.unwrap().pending, 1);
    let out = Command::new(BIN)
        .args(["--database-url", &url, "dead-letters", "discard", &m.id().to_string()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "discarding a dead letter that is gone is an error"
    );
}

/// Runs the daemon with `args` (and `env`) until it exits or `for_at_most` passes (then SIGTERM),
/// returning everything it printed on stdout and stderr.
fn all_output(args: &[&str], env: &[(&str, &str)], for_at_most: Duration) -> String {
    let out_file = std::env::temp_dir().join(format!("outbox-secrets-{}.log", uuid::Uuid::new_v4().simple()));
    let out = std::fs::File::create(&out_file).unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < for_at_most {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap();
    }
    let text = std::fs::read_to_string(&out_file).unwrap();
    std::fs::remove_file(&out_file).ok();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_output_or_log() {
    let bootstrap = broker();
    let pool = outbox_tests::db::fresh_pg().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    // PostgreSQL trusts 127.0.0.1 here, so the planted DSN passwords do not stop the relay.
    let file = std::env::temp_dir().join(format!("outbox-secrets-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &file,
        format!(
            r#"database_url = "postgres://postgres:dsn-userinfo-S3CRET@127.0.0.1:5432/{db}"
[kafka]
"bootstrap.servers" = "{bootstrap}"
"sasl.password" = "kafka-sasl-S3CRET"
"ssl.key.password" = "ssl-key-S3CRET"
"sasl.oauthbearer.client.secret" = "oauth-client-S3CRET"
"#
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut printed = all_output(
        &[
            "--config",
            config,
            "--kafka",
            "sasl.oauthbearer.assertion.private.key.passphrase=assertion-passphrase-S3CRET",
            "--admin-listen",
            &admin,
            "run",
        ],
        &[("OUTBOX_KAFKA_SSL_KEYSTORE_PASSWORD", "keystore-S3CRET")],
        Duration::from_secs(5),
    );
    printed += &all_output(
        &[
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:5432/{db}?password=dsn-query-S3CRET&sslmode=disable"),
            "status",
        ],
        &[],
        Duration::from_secs(30),
    );
    printed += &all_output(
        &[
            "--database-url",
            "postgres://postgres:unreachable-S3CRET@127.0.0.1:1/nowhere?password=unreachable-query-S3CRET",
            "status",
        ],
        &[],
        Duration::from_secs(30),
    );
    std::fs::remove_file(&file).ok();
    assert!(
        printed.contains("configuration"),
        "the relay started and printed its configuration:\n{printed}"
    );
    assert!(printed.contains("database:"), "status ran:\n{printed}");
    let leaked: Vec<&str> = printed.lines().filter(|l| l.contains("S3CRET")).collect();
    assert!(leaked.is_empty(), "secrets printed:\n{}", leaked.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_no_relay_serves_are_reported_in_logs_and_status() {
    let bootstrap = broker();
    let pool = outbox_tests::db::fresh_pg().await;
    let cfg = std::env::temp_dir().join(format!("outbox-lanes-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&cfg, "[relay]\nmax_lanes = 4\n").unwrap();
    let mut relay = RelayArgs::new(BIN, &db_url(&pool), &bootstrap, 100)
        .args(["--config", cfg.to_str().unwrap()])
        .spawn();
    // The lease is 3 s and the stats refresh every 10 s: the warning comes within about 20 s.
    until("the warning", Duration::from_secs(40), || async {
        match relay.count("lanes held by no relay") {
            0 => Err(relay.tail(20)),
            _ => Ok(()),
        }
    })
    .await;
    let line = relay
        .stderr()
        .into_iter()
        .find(|l| l.contains("lanes held by no relay"))
        .unwrap();
    assert!(line.contains("unowned") && line.contains("28"), "{line}");
    let out = Command::new(BIN)
        .args(["--database-url", &db_url(&pool), "status"])
        .output()
        .unwrap();
    let status = String::from_utf8(out.stdout).unwrap();
    assert!(status.contains("unowned lanes: 28 of 32"), "{status}");
    relay.terminate();
    std::fs::remove_file(cfg).ok();
}
