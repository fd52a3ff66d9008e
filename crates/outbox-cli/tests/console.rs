//! The console in a real browser: Debian's headless Chromium, driven through chromedriver
//! (installed by `.ci/services` via `.ci/chromium`), against the `outbox-relay` daemon on a fresh
//! PostgreSQL database and the local Kafka broker. A planted dead letter shows on the page with
//! its values escaped; Retry with a wrong token changes nothing; Retry with the configured token
//! takes it off the page and the relay publishes it.
//!
//! `OUTBOX_CONSOLE_SCREENSHOT=1` also saves the page with the dead letter as
//! `crates/outbox-cli/docs/console.png` (the README's picture).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fantoccini::{Client, Locator};
use outbox::{Message, Store, StoreAdmin};
use outbox_tests::daemon::db_url;
use outbox_tests::kafka::{broker, create_topic, read_until};
use outbox_tests::wait::until;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
const TOKEN: &str = "console-test-t0ken";

#[path = "console/processes.rs"]
mod processes;
use processes::{browser, Proc};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Plants a parked dead letter the way the relay would leave it, and gives the lanes back.
async fn plant_dead_letter(store: &dyn Store, pool: &sqlx::PgPool, msg: &Message, error: &str) {
    let mut tx = pool.begin().await.unwrap();
    let e = outbox::enqueue(&mut tx, msg).await.unwrap();
    tx.commit().await.unwrap();
    let leases = store.acquire("planting", 64, Duration::from_secs(60)).await.unwrap();
    let lease = leases.iter().find(|l| l.lane == e.lane).unwrap();
    let row = store.claim(lease, 1, &[]).await.unwrap().remove(0);
    store.dead_letter(lease, row.pos, error, true).await.unwrap();
    for l in &leases {
        store.release(l).await.unwrap();
    }
}

/// The page's source once `ready` holds for it (reloading until then).
async fn page_when(c: &Client, url: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let ready = &ready;
    until(what, Duration::from_secs(30), || async move {
        c.goto(url).await.map_err(|e| e.to_string())?;
        let src = c.source().await.map_err(|e| e.to_string())?;
        if ready(&src) {
            Ok(src)
        } else {
            Err("not on the page yet".to_owned())
        }
    })
    .await
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// The text of the element with id `id` once the page shows it (up to 30 s); `what` names it in
/// the failure.
async fn text_when_shown(c: &Client, id: &str, what: &str) -> String {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id(id))
        .await
        .expect(what)
        .text()
        .await
        .unwrap()
}

/// Types `token` into the page's token field and clicks the row's Retry button.
async fn retry_with(c: &Client, id: uuid::Uuid, token: &str) {
    let field = c.find(Locator::Id("token")).await.expect("token field");
    field.clear().await.unwrap();
    field.send_keys(token).await.unwrap();
    c.find(Locator::Css(&format!("tr[data-id=\"{id}\"] button.retry")))
        .await
        .expect("Retry button")
        .click()
        .await
        .unwrap();
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_a_dead_letter_and_retries_it_with_the_token() {
    let (_driver, c) = browser().await;
    let bootstrap = broker();
    let pool = outbox_tests::db::fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    // Unique per test run, short enough for the screenshot.
    let t = format!("orders.paid-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let msg = Message::new(t.as_str(), "order 42 paid").key("<order>&42");
    let error = format!("Broker: Unknown topic or partition <{t}>");
    plant_dead_letter(&store, &pool, &msg, &error).await;
    let id = msg.id();

    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = std::env::temp_dir().join(format!("outbox-console-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &cfg,
        format!(
            r#"[[database]]
name = "orders"
url = "{url}"

[[database]]
name = "billing"
url = "postgres://postgres@127.0.0.1:1/billing"

[kafka]
"bootstrap.servers" = "{bootstrap}"

[relay]
poll_interval_ms = 100
lease_ttl_ms = 3000

[admin]
listen = "{admin}"
token = "{TOKEN}"
"#,
            url = db_url(&pool)
        ),
    )
    .unwrap();
    let mut daemon = Proc::start(
        Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "run"])
            .env("RUST_LOG", "info")
            .env_remove("OUTBOX_ADMIN_TOKEN"),
        "daemon",
    );
    let home = format!("http://{admin}/");

    // The dead letter, its values shown as text (escaped, not markup), and the database that is
    // not reached.
    let src = page_when(&c, &home, "the page lists the dead letter", |s| {
        s.contains(&id.to_string())
    })
    .await;
    let row = format!("tr[data-id=\"{id}\"]");
    assert_eq!(text(&c, &format!("{row} td.err")).await, error);
    assert_eq!(text(&c, &format!("{row} td.key")).await, "<order>&42");
    assert_eq!(text(&c, &format!("{row} td.topic")).await, t);
    let injected = c.find_all(Locator::Css("td.key order, td.err *")).await.unwrap();
    assert!(injected.is_empty(), "database values became markup");
    assert!(text(&c, "section[data-db=\"orders\"]").await.contains("parked"));
    assert!(text(&c, "section[data-db=\"billing\"]")
        .await
        .contains("not reached yet"));
    assert!(
        !src.contains("postgres://") && !src.contains(TOKEN),
        "no URL or token on the page:\n{src}"
    );

    // A wrong token: refused, nothing changed.
    retry_with(&c, id, "not-the-token").await;
    let refusal = text_when_shown(&c, "message", "the refusal page").await;
    assert!(
        refusal.contains("wrong") && refusal.contains("Nothing was changed"),
        "{refusal}"
    );
    let st = store.status().await.unwrap();
    assert_eq!((st.pending, st.dead_letters), (0, 1), "a wrong token changed nothing");

    // Back on the page: every lane owned by the running relay, a publish rate measured, the dead
    // letter still there.
    page_when(&c, &home, "all lanes owned and a rate measured", |s| {
        s.contains(&id.to_string()) && s.contains("all owned") && s.contains("msg/s")
    })
    .await;
    if std::env::var_os("OUTBOX_CONSOLE_SCREENSHOT").is_some() {
        let png = c.screenshot().await.unwrap();
        std::fs::create_dir_all(screenshot_path().parent().unwrap()).unwrap();
        std::fs::write(screenshot_path(), png).unwrap();
    }

    // The topic exists now; Retry with the token puts the message back, and the relay publishes it.
    create_topic(&bootstrap, &t, 1).await;
    retry_with(&c, id, TOKEN).await;
    let notice = text_when_shown(&c, "notice", "the notice after the redirect").await;
    assert!(
        notice.contains(&id.to_string()) && notice.contains("put back"),
        "{notice}"
    );
    assert!(c.current_url().await.unwrap().path() == "/");
    assert!(
        c.find_all(Locator::Css(&row)).await.unwrap().is_empty(),
        "the retried dead letter is no longer listed"
    );
    let seen = read_until(
        &bootstrap,
        &t,
        &HashSet::from([id]),
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert!(
        seen.iter().any(|s| s.id == id),
        "published after the retry:\n{}",
        daemon.tail()
    );
    let store = &store;
    until(
        "backlog and dead letters empty",
        Duration::from_secs(30),
        || async move {
            let st = store.status().await.map_err(|e| e.to_string())?;
            if st.pending == 0 && st.dead_letters == 0 {
                Ok(())
            } else {
                Err(format!("{} pending, {} dead letters", st.pending, st.dead_letters))
            }
        },
    )
    .await;
    page_when(&c, &home, "the page shows no dead letters", |s| {
        s.contains("No dead letters.")
    })
    .await;

    c.close().await.unwrap();
    daemon.terminate();
    std::fs::remove_file(&cfg).ok();
}
