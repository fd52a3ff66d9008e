//! One daemon, many databases (`[[database]]`): each gets a relay of its own, metrics carry the
//! database's name, one database down stalls only itself; `/readyz` says what is wrong.

use std::collections::HashSet;
use std::time::Duration;

use outbox::{Message, StoreAdmin};
use outbox_tests::daemon::{enqueue_all, wait_pending_below, RelayArgs, RelayProcess};
use outbox_tests::kafka::{broker, check_delivery, create_topic, read_all, topic};
use outbox_tests::proxy::DbProxy;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// A config file listing `dbs` (name, url) as `[[database]]`, plus `extra` TOML.
fn config(dbs: &[(&str, String)], extra: &str) -> std::path::PathBuf {
    let mut text = String::new();
    for (name, url) in dbs {
        text += &format!("[[database]]\nname = \"{name}\"\nurl = \"{url}\"\n\n");
    }
    text += extra;
    let path = std::env::temp_dir().join(format!("outbox-dbs-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(cfg: &std::path::Path, bootstrap: &str) -> RelayProcess {
    RelayArgs::new(BIN, "", bootstrap, 100)
        .args(["--config", cfg.to_str().unwrap()])
        .spawn()
}

fn pg_url(pool: &sqlx::PgPool, port: u16) -> String {
    let db = pool.connect_options().get_database().unwrap().to_owned();
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

/// The value of `metric{database="name"...}` in a Prometheus text page.
fn metric(page: &str, metric: &str, name: &str) -> Option<f64> {
    let label = format!("database=\"{name}\"");
    page.lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_drains_two_postgres_databases_and_a_mariadb_at_once() {
    let bootstrap = broker();
    let (pg_a, pg_b) = (outbox_tests::db::fresh_pg().await, outbox_tests::db::fresh_pg().await);
    let maria = outbox_tests::db::fresh_mysql().await;
    let maria_url = format!(
        "{}/{}",
        outbox_tests::db::mysql_url(),
        maria.connect_options().get_database().unwrap()
    );
    let topics: Vec<String> = ["dbs-a", "dbs-b", "dbs-m"].iter().map(|p| topic(p)).collect();
    for t in &topics {
        create_topic(&bootstrap, t, 3).await;
    }
    let ids_a = enqueue_all(&pg_a, &topics[0], 400, 13).await;
    let ids_b = enqueue_all(&pg_b, &topics[1], 300, 13).await;
    let mut tx = maria.begin().await.unwrap();
    let msgs: Vec<Message> = (0..200)
        .map(|i| Message::new(topics[2].as_str(), format!("{i}")).key(format!("k{}", i % 13)))
        .collect();
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let ids_m: HashSet<uuid::Uuid> = msgs.iter().map(|m| m.id()).collect();

    let cfg = config(
        &[
            ("orders", pg_url(&pg_a, 5432)),
            ("billing", pg_url(&pg_b, 5432)),
            ("shipping", maria_url),
        ],
        "",
    );
    let mut relay = spawn(&cfg, &bootstrap);
    let stores: [Box<dyn outbox::Store>; 3] = [
        Box::new(outbox::postgres::PgStore::new(pg_a.clone())),
        Box::new(outbox::postgres::PgStore::new(pg_b.clone())),
        Box::new(outbox::mysql::MySqlStore::new(maria.clone())),
    ];
    for s in &stores {
        wait_pending_below(s.as_ref(), 1, Duration::from_secs(60)).await;
    }
    for (t, ids) in topics.iter().zip([&ids_a, &ids_b, &ids_m]) {
        let seen = read_all(&bootstrap, t, ids).await;
        assert_eq!(check_delivery(&seen, ids), 0, "{t}: every message once, per-key order");
    }
    // Each database's figures apart, and each relay holds every lane of its own database.
    let (_, page) = relay.wait_get("/metrics", Duration::from_secs(10), |code, page| {
        code == 200 && metric(page, "outbox_published_total", "shipping") == Some(200.0)
    });
    assert_eq!(metric(&page, "outbox_published_total", "orders"), Some(400.0), "{page}");
    assert_eq!(
        metric(&page, "outbox_published_total", "billing"),
        Some(300.0),
        "{page}"
    );
    for name in ["orders", "billing", "shipping"] {
        assert_eq!(metric(&page, "outbox_lanes_held", name), Some(32.0), "{name}: {page}");
    }
    relay.wait_get("/readyz", Duration::from_secs(10), |code, _| code == 200);
    // Operator commands pick one database by name; several without a name is a clear error.
    let status = std::process::Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--database", "billing", "status"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && out.contains("billing") && out.contains("pending:       0"),
        "{out}"
    );
    let list = std::process::Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "dead-letters", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&list.stderr);
    assert!(!list.status.success() && err.contains("--database NAME"), "{err}");
    relay.terminate();
    std::fs::remove_file(cfg).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_down_stalls_only_itself_and_readyz_names_it() {
    let bootstrap = broker();
    let (up, flaky) = (outbox_tests::db::fresh_pg().await, outbox_tests::db::fresh_pg().await);
    let proxy = DbProxy::start().await;
    let (t_up, t_flaky) = (topic("dbs-up"), topic("dbs-flaky"));
    create_topic(&bootstrap, &t_up, 2).await;
    create_topic(&bootstrap, &t_flaky, 2).await;
    let cfg = config(
        &[("up", pg_url(&up, 5432)), ("flaky", pg_url(&flaky, proxy.port))],
        "[admin]\nbroker_unavailable_ms = 60000\n",
    );
    let relay = spawn(&cfg, &bootstrap);
    relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 200);

    proxy.cut();
    let (code, body) = relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 503);
    assert!(
        body.contains("database flaky") && !body.contains("database up"),
        "{code} {body}"
    );
    // The other database keeps flowing while this one is down.
    let ids_up = enqueue_all(&up, &t_up, 500, 10).await;
    let ids_flaky = enqueue_all(&flaky, &t_flaky, 300, 10).await;
    let store_up = outbox::postgres::PgStore::new(up.clone());
    wait_pending_below(&store_up, 1, Duration::from_secs(30)).await;
    let seen = read_all(&bootstrap, &t_up, &ids_up).await;
    assert_eq!(check_delivery(&seen, &ids_up), 0);
    let store_flaky = outbox::postgres::PgStore::new(flaky.clone());
    assert_eq!(
        store_flaky.status().await.unwrap().pending,
        300,
        "nothing left while cut off"
    );

    proxy.restore().await;
    wait_pending_below(&store_flaky, 1, Duration::from_secs(60)).await;
    let seen = read_all(&bootstrap, &t_flaky, &ids_flaky).await;
    assert_eq!(check_delivery(&seen, &ids_flaky), 0);
    relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 200);
    drop(relay);
    std::fs::remove_file(cfg).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_on_a_broker_outage_past_its_threshold_and_on_lanes_nobody_owns() {
    // The broker: nothing listens on the bootstrap address, so every publish is `Unavailable`.
    let pool = outbox_tests::db::fresh_pg().await;
    let t = topic("dbs-nobroker");
    let cfg = config(
        &[("orders", pg_url(&pool, 5432))],
        "[admin]\nbroker_unavailable_ms = 1500\n",
    );
    let relay = RelayArgs::new(BIN, "", "127.0.0.1:1", 100)
        .args(["--config", cfg.to_str().unwrap(), "--kafka", "message.timeout.ms=1000"])
        .spawn();
    relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 200);
    enqueue_all(&pool, &t, 5, 5).await;
    let (_, body) = relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 503);
    assert!(body.contains("database orders: broker unavailable for"), "{body}");
    assert_eq!(relay.get("/healthz").map(|(c, _)| c), Some(200), "liveness stays up");
    let store = outbox::postgres::PgStore::new(pool.clone());
    let st = store.status().await.unwrap();
    assert_eq!((st.pending, st.dead_letters), (5, 0), "an outage dead-letters nothing");
    drop(relay);

    // Lanes: a relay that may hold 4 of the 32 leaves 28 without an owner; after one lease (3 s)
    // readiness says so.
    let lanes_cfg = config(&[("orders", pg_url(&pool, 5432))], "[relay]\nmax_lanes = 4\n");
    let relay = spawn(&lanes_cfg, &broker());
    let (_, body) = relay.wait_get("/readyz", Duration::from_secs(30), |code, body| {
        code == 503 && body.contains("without an owner")
    });
    let lanes = body
        .split("lanes ")
        .nth(1)
        .and_then(|rest| rest.split(" without").next())
        .unwrap_or_default();
    assert_eq!(lanes.split(", ").count(), 28, "{body}");
    drop(relay);
    std::fs::remove_file(cfg).ok();
    std::fs::remove_file(lanes_cfg).ok();
}

/// When a second relay starts, the first hands half its lanes back and the second takes them at
/// its next round. A released lane kept no time of its release, so `/readyz` counted it "without
/// an owner for longer than the lease" at once: healthy relays failed readiness at every
/// rebalance and rolling deploy. A released lane now counts from its release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_ready_while_a_second_relay_takes_half_the_lanes() {
    let pool = outbox_tests::db::fresh_pg().await;
    let cfg = config(&[("orders", pg_url(&pool, 5432))], "");
    let first = spawn(&cfg, &broker());
    // Past one lease (3 s) readiness looks at the lanes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    first.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 200);
    let second = spawn(&cfg, &broker());
    let store = outbox::postgres::PgStore::new(pool.clone());
    let started = std::time::Instant::now();
    let mut refused = Vec::new();
    let mut shared_since = None;
    while started.elapsed() < Duration::from_secs(30) {
        if let Some((503, body)) = first.get("/readyz") {
            refused.push(body);
        }
        let lanes = store.status().await.unwrap().lanes;
        let owners: std::collections::HashSet<_> = lanes.iter().filter_map(|l| l.owner.clone()).collect();
        if owners.len() == 2 && lanes.iter().all(|l| l.owner.is_some()) {
            let since = *shared_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        shared_since.is_some(),
        "the two relays did not share the lanes within 30 s"
    );
    assert!(refused.is_empty(), "readiness failed during the rebalance: {refused:?}");
    drop((first, second));
    std::fs::remove_file(cfg).ok();
}

/// A store write the database keeps refusing (here a trigger on the outbox's DELETE, which every
/// mark runs) leaves the lane retrying with its lease held: no relay takes it over and no lane is
/// without an owner, so readiness has to tell it by itself. Once the database takes the marks
/// again the rows drain, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_marks_are_refused_for_longer_than_the_lease_and_the_rows_drain_after() {
    let bootstrap = broker();
    let pool = outbox_tests::db::fresh_pg().await;
    let t = topic("dbs-refused");
    create_topic(&bootstrap, &t, 1).await;
    outbox_tests::db::exec(
        &pool,
        "CREATE FUNCTION refuse_marks() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'marks refused by a trigger'; END $$; \
         CREATE TRIGGER refuse_marks BEFORE DELETE ON outbox_messages \
         FOR EACH ROW EXECUTE FUNCTION refuse_marks()",
    )
    .await;
    let cfg = config(&[("orders", pg_url(&pool, 5432))], "");
    let relay = spawn(&cfg, &bootstrap);
    relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 200);
    let ids = enqueue_all(&pool, &t, 50, 5).await;
    let (_, body) = relay.wait_get("/readyz", Duration::from_secs(30), |code, body| {
        code == 503 && body.contains("store writes failing")
    });
    assert!(body.contains("marks refused by a trigger"), "{body}");
    outbox_tests::db::exec(&pool, "DROP TRIGGER refuse_marks ON outbox_messages").await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    wait_pending_below(&store, 1, Duration::from_secs(60)).await;
    relay.wait_get("/readyz", Duration::from_secs(30), |code, _| code == 200);
    // The lane kept its lease and its batch, retrying only the mark: nothing was sent twice.
    assert_eq!(check_delivery(&read_all(&bootstrap, &t, &ids).await, &ids), 0);
    drop(relay);
    std::fs::remove_file(cfg).ok();
}
