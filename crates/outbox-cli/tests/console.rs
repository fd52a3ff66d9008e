//! The console in a real browser: Debian's headless Chromium, driven through chromedriver
//! (installed by `.ci/services` via `.ci/chromium`), against the `outbox-relay` daemon on a fresh
//! PostgreSQL database and the local Kafka broker. A planted dead letter shows on the page with
//! its values escaped; Retry with a wrong token changes nothing; Retry with the configured token
//! takes it off the page and the relay publishes it.
//!
//! `OUTBOX_CONSOLE_SCREENSHOT=1` also saves the page with the dead letter as
//! `crates/outbox-cli/docs/console.png` (the README's picture).

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use outbox::{Message, Store, StoreAdmin};
use outbox_tests::daemon::db_url;
use outbox_tests::kafka::{broker, create_topic, read_until};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
const TOKEN: &str = "console-test-t0ken";

/// An executable called `name` on `PATH` (or in /usr/bin).
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `within`.
async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pids of every descendant of `pid` (from /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// A process this test started, killed with its descendants (the browser under chromedriver)
/// when dropped; its output goes to a log file, quoted when the test fails.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(cmd: &mut Command, name: &str) -> Proc {
        let log = std::env::temp_dir().join(format!("outbox-console-{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { child, log }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM; asserts a clean exit within 30 s.
    fn terminate(&mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM:\n{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(0), "{}", self.tail());
    }
}

impl Proc {
    /// Kills the process and its descendants if it still runs.
    fn kill_all(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            for pid in descendants(self.child.id()) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_all();
        if !std::thread::panicking() {
            std::fs::remove_file(&self.log).ok();
        }
    }
}

/// chromedriver and the browser profile: the processes are killed and the profile removed on drop.
struct Browser {
    driver: Proc,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.driver.kill_all();
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

/// Starts chromedriver on a port of its own and opens a headless Chromium session.
async fn browser() -> (Browser, Client) {
    let hint = "run `bash .ci/services` (it installs Debian's chromium and chromium-driver through .ci/chromium)";
    let driver_bin = on_path("chromedriver").unwrap_or_else(|| panic!("chromedriver not found: {hint}"));
    let chromium = on_path("chromium").unwrap_or_else(|| panic!("chromium not found: {hint}"));
    let port = free_port();
    let driver = Proc::start(Command::new(driver_bin).arg(format!("--port={port}")), "chromedriver");
    let profile = std::env::temp_dir().join(format!("outbox-console-chromium-{}", uuid::Uuid::new_v4().simple()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let (caps, webdriver) = (&caps, webdriver.as_str());
    let client = until("chromedriver answers", Duration::from_secs(30), || async move {
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(webdriver)
            .await
            .ok()
    })
    .await;
    (Browser { driver, profile }, client)
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
        c.goto(url).await.ok()?;
        let src = c.source().await.ok()?;
        ready(&src).then_some(src)
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
    let msg_el = c
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id("message"))
        .await
        .expect("the refusal page");
    let refusal = msg_el.text().await.unwrap();
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
    let notice = c
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id("notice"))
        .await
        .expect("the notice after the redirect");
    let notice = notice.text().await.unwrap();
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
            let st = store.status().await.ok()?;
            (st.pending == 0 && st.dead_letters == 0).then_some(())
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
