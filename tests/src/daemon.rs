//! Driving the `outbox-relay` daemon binary as an operator would: start it (its stderr collected
//! line by line, so a chatty relay never blocks on a full pipe), signal it, wait for it, and watch
//! the backlog it drains. The binary's path is passed in (tests have `CARGO_BIN_EXE_outbox-relay`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{Message, Store};

/// The URL a relay process uses for the database behind `pool` (the local server).
pub fn db_url(pool: &sqlx::PgPool) -> String {
    let opts = pool.connect_options();
    format!(
        "postgres://postgres@127.0.0.1:5432/{}",
        opts.get_database().expect("database name")
    )
}

/// How to start a relay process.
#[derive(Debug, Clone)]
pub struct RelayArgs {
    /// Path of the `outbox-relay` binary.
    pub bin: String,
    /// `--database-url` (not passed when empty: the databases then come from a config file).
    pub database_url: String,
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// `--batch-size`.
    pub batch_size: usize,
    /// `--lease-ttl-ms`.
    pub lease_ttl_ms: u64,
    /// `--poll-interval-ms`.
    pub poll_interval_ms: u64,
    /// `--pace-max-lag-ms`: 5 s in tests. The adaptive pace counts the writes of every database on
    /// the server, so the other tests running beside one look like a busy service; with the
    /// default (5 min) a lane could rest for most of a test's wait.
    pub pace_max_lag_ms: u64,
    /// More flags, placed before `run`.
    pub extra: Vec<String>,
    /// Environment variables for the process.
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` of the process.
    pub log: String,
}

impl RelayArgs {
    /// Defaults for tests: poll every 100 ms, lease 3 s, pace lag 5 s, log level info.
    pub fn new(bin: &str, database_url: &str, bootstrap: &str, batch_size: usize) -> Self {
        RelayArgs {
            bin: bin.to_owned(),
            database_url: database_url.to_owned(),
            bootstrap: bootstrap.to_owned(),
            batch_size,
            lease_ttl_ms: 3000,
            poll_interval_ms: 100,
            pace_max_lag_ms: 5000,
            extra: Vec::new(),
            env: Vec::new(),
            log: "info".into(),
        }
    }

    /// Sets `--lease-ttl-ms`.
    pub fn lease_ttl_ms(mut self, ms: u64) -> Self {
        self.lease_ttl_ms = ms;
        self
    }

    /// Adds flags (before `run`).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Sets `RUST_LOG`.
    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.to_owned();
        self
    }

    /// Starts `outbox-relay ... run` with a free admin port.
    pub fn spawn(&self) -> RelayProcess {
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        if !self.database_url.is_empty() {
            cmd.args(["--database-url", &self.database_url]);
        }
        let mut child = cmd
            .args(["--kafka", &format!("bootstrap.servers={}", self.bootstrap)])
            .args(["--batch-size", &self.batch_size.to_string()])
            .args(["--lease-ttl-ms", &self.lease_ttl_ms.to_string()])
            .args(["--poll-interval-ms", &self.poll_interval_ms.to_string()])
            .args(["--pace-max-lag-ms", &self.pace_max_lag_ms.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(&self.extra)
            .arg("run")
            .env("RUST_LOG", &self.log)
            .env_remove("RUST_BACKTRACE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start outbox-relay");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        RelayProcess {
            child,
            log,
            admin: admin.to_string(),
        }
    }
}

/// A running relay process.
pub struct RelayProcess {
    /// The process.
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Its admin endpoint (`127.0.0.1:PORT`).
    pub admin: String,
}

impl RelayProcess {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`-TERM`, `-KILL`, `-STOP`, `-CONT`).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} {}", self.pid());
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        self.child.kill().ok();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit, failing the test after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < within,
                "relay did not exit within {within:?}; log tail:\n{}",
                self.tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then asserts a clean exit (code 0) within 30 s; the log tail explains a failure.
    pub fn terminate(&mut self) {
        self.signal("-TERM");
        let code = self.wait_exit(Duration::from_secs(30)).code();
        assert_eq!(code, Some(0), "{}", self.tail(20));
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// How many stderr lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// `GET path` on the admin endpoint: status code and body (`None` while nothing answers).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.admin).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Some((code, body))
    }

    /// Polls `GET path` until `done(code, body)` holds, failing the test after `within`; returns the
    /// last answer.
    pub fn wait_get(&self, path: &str, within: Duration, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let start = Instant::now();
        loop {
            let got = self.get(path);
            if let Some((code, body)) = &got {
                if done(*code, body) {
                    return (*code, body.clone());
                }
            }
            assert!(
                start.elapsed() < within,
                "GET {path}: last answer {got:?} after {within:?}; log tail:\n{}",
                self.tail(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` stderr lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // A failing test must not leave relays running (or stopped) behind it.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").args(["-CONT", &self.pid().to_string()]).status();
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Enqueues `n` messages (200-byte payloads) over `keys` keys, 500 per committed transaction.
pub async fn enqueue_all(pool: &sqlx::PgPool, topic: &str, n: usize, keys: usize) -> HashSet<uuid::Uuid> {
    let mut ids = HashSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|i| Message::new(topic, vec![b'p'; 200]).key(format!("k{}", i % keys)))
            .collect();
        crate::db::commit_batch(pool, &msgs).await;
        ids.extend(msgs.iter().map(|m| m.id()));
    }
    ids
}

/// Pending rows in the outbox.
pub async fn pending(store: &dyn Store) -> i64 {
    store.status().await.unwrap().pending
}

/// Waits until fewer than `n` rows are pending, failing the test after `within`.
pub async fn wait_pending_below(store: &dyn Store, n: i64, within: Duration) {
    crate::wait::until(&format!("fewer than {n} pending"), within, || async {
        match pending(store).await {
            p if p < n => Ok(()),
            p => Err(format!("{p} pending")),
        }
    })
    .await
}

/// Waits for `child` to exit, for up to `within`; kills it and fails the test with `what` then.
pub async fn exit_within(child: &mut Child, within: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > within {
            child.kill().ok();
            panic!("{what}: no exit within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
