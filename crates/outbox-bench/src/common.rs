//! Shared plumbing: settings, fresh databases, backlog fill, brokers, CPU and memory probes, and
//! the report (table rows, JSON).

mod cpu;
mod kafka;
mod report;
mod task;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

pub(crate) use cpu::{cpu_secs, rss_kib, CpuProbe, CpuUsed};
pub(crate) use kafka::{broker_pid, delete_topic, kafka_bootstrap, new_topic};
pub(crate) use report::{machine, median, print_figure, Figure, Row, Target};
pub(crate) use task::UntilStopped;

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
    /// The variants to measure, by label (figures 1 and 3); all when empty.
    pub(crate) only: Vec<String>,
}

impl Env {
    /// Whether the variant labelled `label` is measured (`--only`).
    pub(crate) fn keeps(&self, label: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == label)
    }

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

/// Sleeps until `at`.
pub(crate) async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}
