//! Shared plumbing: settings, fresh databases, backlog fill, brokers, CPU and memory probes, and
//! the report (table rows, JSON).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Topic partitions used by every benchmark topic.
pub(crate) const PARTITIONS: i32 = 8;
/// Payload size of benchmark messages.
pub(crate) const PAYLOAD_BYTES: usize = 200;
/// Distinct keys of keyed benchmark messages.
pub(crate) const KEYS: usize = 10_000;

/// Everything a benchmark needs to know about its environment.
#[derive(Clone)]
pub(crate) struct Env {
    /// Server URL of PostgreSQL (a database name in it is replaced per benchmark).
    pub(crate) pg_url: String,
    /// Bootstrap of the local Apache Kafka broker (its own process).
    pub(crate) kafka: String,
    /// Bootstrap of librdkafka's in-process mock cluster, when enabled.
    pub(crate) mock: Option<String>,
    /// Topics created on the mock cluster up front (its admin API does not create topics), taken
    /// one per [`new_topic`] call.
    pub(crate) mock_topics: Arc<Mutex<Vec<String>>>,
    /// Smoke-run sizes.
    pub(crate) quick: bool,
    /// Rounds override.
    pub(crate) rounds: Option<usize>,
    /// Create benchmark databases with `jit = off` (an experiment: see BENCHMARKS.md, figure 2).
    pub(crate) jit_off: bool,
}

impl Env {
    /// Rounds to run: the override, else `full` or `quick`.
    pub(crate) fn rounds(&self, full: usize, quick: usize) -> usize {
        self.rounds.unwrap_or(if self.quick { quick } else { full }).max(1)
    }

    /// `full` or `quick` by mode.
    pub(crate) fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// The brokers to run broker-bound figures on: Kafka always, the mock cluster when enabled.
    pub(crate) fn brokers(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![("kafka", self.kafka.clone())];
        if let Some(m) = &self.mock {
            v.push(("mock", m.clone()));
        }
        v
    }
}

/// A database created for one benchmark, dropped by [`BenchDb::drop_db`].
pub(crate) struct BenchDb {
    /// Pool on it.
    pub(crate) pool: PgPool,
    /// Its URL (for a child relay process).
    pub(crate) url: String,
    name: String,
    admin: PgConnectOptions,
}

impl BenchDb {
    /// A new database with the outbox schema and the benchmark's business tables, pool of
    /// `max_conns` connections.
    pub(crate) async fn create(env: &Env, max_conns: u32) -> anyhow::Result<Self> {
        let admin: PgConnectOptions = env.pg_url.parse().context("--pg-url is not a valid URL")?;
        let name = format!("outbox_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut conn = admin.connect().await.context("connecting to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        if env.jit_off {
            sqlx::query(&format!("ALTER DATABASE {name} SET jit = off"))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(max_conns)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(admin.clone().database(&name))
            .await?;
        outbox::postgres::migrate(&pool).await?;
        sqlx::raw_sql(
            "CREATE TABLE bench_orders (id BIGSERIAL PRIMARY KEY, customer INT NOT NULL, amount BIGINT NOT NULL, \
               note TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now()); \
             CREATE TABLE bench_processed (id UUID PRIMARY KEY, topic TEXT NOT NULL, len INT NOT NULL, \
               at TIMESTAMPTZ NOT NULL DEFAULT now());",
        )
        .execute(&pool)
        .await?;
        let base = env.pg_url.rsplit_once('/').map_or(env.pg_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(BenchDb { pool, url, name, admin })
    }

    /// Closes the pool and drops the database.
    pub(crate) async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut conn) = self.admin.connect().await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(&mut conn)
                .await;
        }
    }
}

/// A payload of [`PAYLOAD_BYTES`] bytes.
pub(crate) fn payload() -> Vec<u8> {
    let mut p = br#"{"order":12345,"customer":678,"amount":"99.95","items":["#.to_vec();
    p.resize(PAYLOAD_BYTES - 2, b'x');
    p.extend_from_slice(b"]}");
    p
}

/// Key number `i`.
pub(crate) fn key(i: usize) -> String {
    format!("key-{:05}", i % KEYS)
}

/// Adds `n` committed, keyed messages ([`KEYS`] keys, 200-byte payloads) to the outbox with one
/// `INSERT ... SELECT generate_series` (the same rows `enqueue` writes: real lanes, dense per-key
/// seqs that continue the key counters, positions following seq per key). Returns the seconds taken.
pub(crate) async fn fill_backlog(pool: &PgPool, topic: &str, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let lanes: Vec<i32> = keys
        .iter()
        .map(|k| outbox::lane_of(Some(k), uuid::Uuid::nil(), outbox::LANES))
        .collect();
    let mut tx = pool.begin().await?;
    // Make sure every key has a counter row, then take a block of seqs per key.
    sqlx::query("INSERT INTO outbox_keys (key, seq) SELECT k, 0 FROM unnest($1::text[]) AS k ON CONFLICT DO NOTHING")
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "WITH base AS (SELECT key, seq FROM outbox_keys WHERE key = ANY($1) FOR UPDATE), \
              k AS (SELECT row_number() OVER (ORDER BY u.key) - 1 AS kn, u.key, u.lane, b.seq AS base \
                    FROM unnest($1::text[], $2::int[]) AS u(key, lane) JOIN base b ON b.key = u.key), \
              up AS (UPDATE outbox_keys o SET seq = o.seq + ($3::bigint + $5 - 1 - k.kn) / $5 FROM k WHERE o.key = k.key) \
         INSERT INTO outbox_messages (lane, id, topic, key, seq, payload) \
         SELECT k.lane, gen_random_uuid(), $4, k.key, k.base + i / $5 + 1, $6 \
         FROM generate_series(0, $3::bigint - 1) AS i JOIN k ON k.kn = i % $5 ORDER BY i",
    )
    .bind(&keys)
    .bind(&lanes)
    .bind(n as i64)
    .bind(topic)
    .bind(KEYS as i64)
    .bind(payload())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("ANALYZE outbox_messages").execute(pool).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Rows waiting in the outbox.
pub(crate) async fn pending(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox_messages")
        .fetch_one(pool)
        .await?)
}

/// Creates a topic with [`PARTITIONS`] partitions and a unique name (on the mock cluster: takes
/// one of the topics created at start).
pub(crate) async fn new_topic(env: &Env, bootstrap: &str, prefix: &str) -> anyhow::Result<String> {
    if env.mock.as_deref() == Some(bootstrap) {
        return env
            .mock_topics
            .lock()
            .expect("mock topics lock")
            .pop()
            .context("out of pre-created mock cluster topics");
    }
    let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let res = admin
        .create_topics(
            &[NewTopic::new(&name, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(name)
}

/// The local Apache Kafka broker's directory (`.ci/kafka up`, as `.ci/services` starts it).
const KAFKA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/kafka/single");

/// Starts the local Apache Kafka broker with the repository's script if nothing listens on
/// 127.0.0.1:19092 (`OUTBOX_BENCH_KAFKA` names another one).
pub(crate) fn kafka_bootstrap() -> anyhow::Result<String> {
    if let Ok(b) = std::env::var("OUTBOX_BENCH_KAFKA") {
        return Ok(b);
    }
    let port = 19092;
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/kafka");
        let st = std::process::Command::new("bash")
            .arg(script)
            .args(["up", KAFKA_DIR, "1", &port.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), ".ci/kafka up failed");
    }
    Ok(format!("127.0.0.1:{port}"))
}

/// The pid of the local Kafka broker, if it was started by `.ci/kafka`.
pub(crate) fn broker_pid() -> Option<u32> {
    let dir = std::fs::read_to_string("/tmp/outbox-kafka-19092.dir")
        .map_or_else(|_| KAFKA_DIR.to_owned(), |d| d.trim().to_owned());
    std::fs::read_to_string(format!("{dir}/n1/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) used so far by process `pid` (`None`: this process).
pub(crate) fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / clk_tck()
}

/// CPU seconds used so far by all `postgres` server processes.
pub(crate) fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(|pid| cpu_secs(Some(pid)))
        .sum()
}

/// CPU use of this process, the broker process and PostgreSQL over an interval.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuProbe {
    me: f64,
    broker: f64,
    pg: f64,
    broker_pid: Option<u32>,
}

/// CPU seconds spent during a [`CpuProbe`] interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CpuUsed {
    /// This process (relay, producer, load generator; with the mock cluster, the broker too).
    pub(crate) bench: f64,
    /// The Kafka broker process (0 when the broker was the in-process mock cluster).
    pub(crate) broker: f64,
    /// All PostgreSQL server processes.
    pub(crate) postgres: f64,
}

impl CpuProbe {
    /// Starts measuring; `broker_pid` is the broker's process, if it has one.
    pub(crate) fn start(broker_pid: Option<u32>) -> Self {
        CpuProbe {
            me: cpu_secs(None),
            broker: broker_pid.map_or(0.0, |p| cpu_secs(Some(p))),
            pg: postgres_cpu_secs(),
            broker_pid,
        }
    }

    /// CPU used since `start`.
    pub(crate) fn stop(&self) -> CpuUsed {
        CpuUsed {
            bench: cpu_secs(None) - self.me,
            broker: self.broker_pid.map_or(0.0, |p| cpu_secs(Some(p))) - self.broker,
            postgres: postgres_cpu_secs() - self.pg,
        }
    }
}

/// `VmRSS` and `VmHWM` of `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Median of `v` (mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// How a target compares: the ratio (or value) must be at least, or at most, the bound.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) enum Target {
    /// Value must be >= this.
    AtLeast(f64),
    /// Value must be <= this.
    AtMost(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }

    fn show(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {}", fmt_num(t)),
            Target::AtMost(t) => format!("<= {}", fmt_num(t)),
        }
    }
}

/// One line of a figure: a measured quantity over rounds, optionally as a ratio to a baseline.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// What was measured.
    pub(crate) name: String,
    /// Unit of `values`.
    pub(crate) unit: String,
    /// One value per round.
    pub(crate) values: Vec<f64>,
    /// Median of `values`.
    pub(crate) median: f64,
    /// The baseline row's name, when this row is compared with one.
    pub(crate) baseline: Option<String>,
    /// Per-round ratio to the baseline (same round).
    pub(crate) ratios: Vec<f64>,
    /// Median of `ratios`.
    pub(crate) ratio: Option<f64>,
    /// The target, on the ratio when there is a baseline, else on the median.
    pub(crate) target: Option<Target>,
    /// Whether the target is met.
    pub(crate) met: Option<bool>,
    /// Extra facts (CPU per message, phases, achieved rate...).
    pub(crate) extra: BTreeMap<String, f64>,
    /// Free text.
    pub(crate) note: String,
}

impl Row {
    /// A row of raw values.
    pub(crate) fn new(name: impl Into<String>, unit: impl Into<String>, values: Vec<f64>) -> Self {
        Row {
            name: name.into(),
            unit: unit.into(),
            median: median(&values),
            values,
            baseline: None,
            ratios: Vec::new(),
            ratio: None,
            target: None,
            met: None,
            extra: BTreeMap::new(),
            note: String::new(),
        }
    }

    /// Compares with `base` round by round (`value / base`).
    pub(crate) fn vs(mut self, base: &Row) -> Self {
        self.ratios = self.values.iter().zip(&base.values).map(|(v, b)| v / b).collect();
        self.ratio = Some(median(&self.ratios));
        self.baseline = Some(base.name.clone());
        self.check();
        self
    }

    /// Sets the target.
    pub(crate) fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self.check();
        self
    }

    /// Adds an extra fact.
    pub(crate) fn extra(mut self, k: &str, v: f64) -> Self {
        self.extra.insert(k.into(), v);
        self
    }

    /// Sets the note.
    pub(crate) fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }

    fn check(&mut self) {
        if let Some(t) = self.target {
            self.met = Some(t.met(self.ratio.unwrap_or(self.median)));
        }
    }
}

/// One benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// Subcommand that produced it.
    pub(crate) id: String,
    /// Title.
    pub(crate) title: String,
    /// Broker used, and other conditions.
    pub(crate) setup: String,
    /// Rounds run.
    pub(crate) rounds: usize,
    /// Rows.
    pub(crate) rows: Vec<Row>,
    /// Wall time of the benchmark in seconds.
    pub(crate) seconds: f64,
}

/// Formats a number compactly.
pub(crate) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Prints a figure as a Markdown table.
pub(crate) fn print_figure(f: &Figure) {
    println!("\n### {} ({} rounds, {:.0} s)\n", f.title, f.rounds, f.seconds);
    println!("{}\n", f.setup);
    println!("| measurement | median | unit | per round | vs | ratio (median) | target | met | notes |");
    println!("|---|---:|---|---|---|---:|---|---|---|");
    for r in &f.rows {
        let rounds: Vec<String> = r.values.iter().map(|v| fmt_num(*v)).collect();
        let mut notes: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={}", fmt_num(*v))).collect();
        if !r.note.is_empty() {
            notes.push(r.note.clone());
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            fmt_num(r.median),
            r.unit,
            rounds.join(", "),
            r.baseline.as_deref().unwrap_or(""),
            r.ratio.map_or(String::new(), fmt_num),
            r.target.map_or(String::new(), |t| t.show()),
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            },
            notes.join("; ")
        );
    }
}

/// Facts about the machine the benchmark ran on.
pub(crate) async fn machine(env: &Env) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?".into(), |(_, v)| v.trim().to_owned());
    m.insert("cpu".into(), model);
    m.insert(
        "cores".into(),
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string()),
    );
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(l) = mem.lines().next() {
        m.insert("memory".into(), l.replace("MemTotal:", "").trim().to_owned());
    }
    m.insert(
        "kernel".into(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    m.insert(
        "loadavg_at_start".into(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    m.insert("librdkafka".into(), rdkafka::util::get_rdkafka_version().1);
    if let Ok(opts) = env.pg_url.parse::<PgConnectOptions>() {
        if let Ok(mut c) = opts.connect().await {
            for (k, q) in [
                ("postgres", "SELECT version()"),
                ("pg_synchronous_commit", "SHOW synchronous_commit"),
                ("pg_fsync", "SHOW fsync"),
                ("pg_shared_buffers", "SHOW shared_buffers"),
            ] {
                if let Ok(v) = sqlx::query_scalar::<_, String>(q).fetch_one(&mut c).await {
                    m.insert(k.into(), v);
                }
            }
            c.close().await.ok();
        }
    }
    m.insert("quick".into(), env.quick.to_string());
    m
}

/// Sleeps until `at`.
pub(crate) async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}

/// Deletes a topic (best effort: frees the broker's memory between runs; not on the mock cluster).
pub(crate) async fn delete_topic(env: &Env, bootstrap: &str, topic: &str) {
    if env.mock.as_deref() == Some(bootstrap) {
        return;
    }
    let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let _ = tokio::time::timeout(Duration::from_secs(15), admin.delete_topics(&[topic], &opts)).await;
}
