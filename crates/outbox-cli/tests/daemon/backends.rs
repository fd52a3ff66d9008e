//! The backend follows the database URL's scheme (MariaDB / MySQL, SQLite), and the outbox tables
//! may live in a PostgreSQL schema of their own, whose name must be a plain identifier.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use outbox::{Message, Store};
use outbox_tests::daemon::{db_url, wait_pending_below, RelayArgs};
use outbox_tests::kafka::{broker, check_delivery, create_topic, read_all, topic};

use super::{spawn_relay, BIN};

/// Enqueues `n` keyed messages on any backend's pool.
macro_rules! enqueue_on {
    ($pool:expr, $t:expr, $n:expr) => {{
        let mut tx = $pool.begin().await.unwrap();
        let msgs: Vec<Message> = (0..$n)
            .map(|i| Message::new($t.clone(), format!("{i}")).key(format!("k{}", i % 7)))
            .collect();
        outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        msgs.iter().map(|m| m.id()).collect::<HashSet<uuid::Uuid>>()
    }};
}

async fn relay_on(url: &str, store: &dyn Store, t: &str, ids: &HashSet<uuid::Uuid>, bootstrap: &str) {
    let mut relay = spawn_relay(url, bootstrap, 100);
    wait_pending_below(store, 1, Duration::from_secs(60)).await;
    relay.terminate();
    let seen = read_all(bootstrap, t, ids).await;
    assert_eq!(check_delivery(&seen, ids), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_follows_the_url_scheme_mysql_and_sqlite() {
    let bootstrap = broker();

    // MariaDB / MySQL.
    let pool = outbox_tests::db::fresh_mysql().await;
    let name = pool.connect_options().get_database().unwrap().to_owned();
    let url = format!("{}/{name}", outbox_tests::db::mysql_url());
    let t = topic("daemon-mysql");
    create_topic(&bootstrap, &t, 2).await;
    let ids = enqueue_on!(pool, t, 300);
    let store = outbox::mysql::MySqlStore::new(pool.clone());
    relay_on(&url, &store, &t, &ids, &bootstrap).await;

    // SQLite: the daemon creates the schema itself (`migrate`).
    let path = std::env::temp_dir().join(format!("outbox-daemon-{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let out = Command::new(BIN)
        .args(["--database-url", &url, "migrate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let t = topic("daemon-sqlite");
    create_topic(&bootstrap, &t, 2).await;
    let ids = enqueue_on!(pool, t, 300);
    let store = outbox::sqlite::SqliteStore::new(pool.clone());
    relay_on(&url, &store, &t, &ids, &bootstrap).await;
    std::fs::remove_file(path).ok();
}

#[test]
fn a_schema_name_that_is_not_a_plain_identifier_is_refused_at_startup() {
    for bad in ["outbox; DROP TABLE orders", "Outbox", "out\"box", "1st"] {
        let start = Instant::now();
        let out = Command::new(BIN)
            .args(["--database-url", "postgres://u:hunter2@127.0.0.1:5432/x"])
            .args(["--database-schema", bad, "status"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid database_schema") && err.contains("plain identifier"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "a secret leaked: {err}");
        assert!(start.elapsed() < Duration::from_secs(10), "refused before connecting");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_tables_in_their_own_schema() {
    let bootstrap = broker();
    let pool = outbox_tests::db::fresh_pg_unmigrated().await;
    let url = db_url(&pool);
    let out = Command::new(BIN)
        .args(["--database-url", &url, "--database-schema", "orders_outbox", "migrate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT table_schema FROM information_schema.tables WHERE table_name = 'outbox_messages'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(tables, vec!["orders_outbox".to_owned()], "created in the schema only");

    // The service finds the tables through its search_path.
    let opts = (*pool.connect_options())
        .clone()
        .options([("search_path", "orders_outbox,public")]);
    let app = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .unwrap();
    let t = topic("daemon-schema");
    create_topic(&bootstrap, &t, 2).await;
    let ids = enqueue_on!(app, t, 200);
    let store = outbox::postgres::PgStore::new(app.clone());
    let mut relay = RelayArgs::new(BIN, &url, &bootstrap, 50)
        .args(["--database-schema", "orders_outbox"])
        .spawn();
    wait_pending_below(&store, 1, Duration::from_secs(60)).await;
    relay.terminate();
    let seen = read_all(&bootstrap, &t, &ids).await;
    assert_eq!(check_delivery(&seen, &ids), 0);
}
