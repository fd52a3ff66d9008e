//! The conformance suite every inbox backend passes. `inbox_suite!(Db, fresh, fresh_unmigrated)`
//! expands to one `#[tokio::test]` per scenario, where `fresh` is a future of a new, migrated
//! `Pool<Db>` and `fresh_unmigrated` one of a new, empty one; each scenario is written once, for
//! every database. The crate that expands it needs `outbox-inbox`
//! (with the database's feature), `metrics`, `async-trait`, `sqlx`, `tokio` and `uuid`.
//!
//! The suite's own statements are portable SQL with the values inlined (generated consumer names,
//! test keys and ids: nothing to quote), on a business table `effects` created by the suite. What
//! cannot be written portably, picking a key's rows in the inbox tables, moving a time back, the
//! outbox's migrations and store, comes from the database's [`Dialect`]: a new backend implements it
//! to get the suite.
//!
//! The scenarios are grouped by topic in the submodules, one hidden macro each (duplicates, gaps
//! under `Accept`, `Hold`, failures and concurrency, retention, sources, the upgrade to sources);
//! `inbox_suite!` expands them all, after the harness they share, into the calling module. Only the
//! harness takes the suite's arguments: the scenarios reach the database type as `Db` and the fresh
//! databases through the harness's `migrated` and `unmigrated`.

mod concurrency;
mod dedup;
mod gaps;
mod harness;
mod hold;
mod retention;
mod sources;
mod upgrade;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Once, OnceLock};

/// The SQL (and the outbox pieces) the suite cannot state once for all databases.
pub trait Dialect: sqlx::Database {
    /// A condition selecting the rows of `key` (a test key, no quotes in it) in
    /// `outbox_inbox_keys` and `outbox_inbox_gaps`. By default the `key` column.
    fn key_is(key: &str) -> String {
        format!("key = '{key}'")
    }
    /// An expression: the time in `column` (a time column of the inbox tables) two days earlier.
    fn two_days_before(column: &str) -> String;
    /// Column names and values identifying `key` (a test key) in an `INSERT` into
    /// `outbox_inbox_keys` (or, with `gaps`, `outbox_inbox_gaps`) as migration 0002 created them:
    /// `(columns, values)`. By default the `key` column.
    fn key_insert(key: &str, _gaps: bool) -> (&'static str, String) {
        ("key", format!("'{key}'"))
    }
    /// Placeholder number `n` (from 1) of a statement.
    fn param(n: usize) -> String;
    /// An expression of the current time for the inbox tables' time columns.
    const NOW: &'static str;
    /// The type of a binary column.
    const BLOB: &'static str;
    /// The outbox's embedded migrations.
    const MIGRATOR: &'static sqlx::migrate::Migrator;
    /// Runs the outbox's `migrate`.
    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>>;
    /// The relay's store on `pool`.
    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store>;
}

impl Dialect for sqlx::Postgres {
    fn two_days_before(column: &str) -> String {
        format!("{column} - interval '2 days'")
    }

    fn param(n: usize) -> String {
        format!("${n}")
    }

    const NOW: &'static str = "now()";
    const BLOB: &'static str = "BYTEA";
    const MIGRATOR: &'static sqlx::migrate::Migrator = &outbox::postgres::MIGRATOR;

    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>> {
        Box::pin(outbox::postgres::migrate(pool))
    }

    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store> {
        std::sync::Arc::new(outbox::postgres::PgStore::new(pool))
    }
}

// Keys are found by their SHA-256; times are DATETIME(6).
impl Dialect for sqlx::MySql {
    fn key_is(key: &str) -> String {
        format!("key_hash = UNHEX(SHA2('{key}', 256))")
    }

    fn two_days_before(column: &str) -> String {
        format!("{column} - INTERVAL 2 DAY")
    }

    fn key_insert(key: &str, gaps: bool) -> (&'static str, String) {
        if gaps {
            ("key_hash", format!("UNHEX(SHA2('{key}', 256))"))
        } else {
            ("`key`, key_hash", format!("'{key}', UNHEX(SHA2('{key}', 256))"))
        }
    }

    fn param(_: usize) -> String {
        "?".into()
    }

    const NOW: &'static str = "UTC_TIMESTAMP(6)";
    const BLOB: &'static str = "BLOB";
    const MIGRATOR: &'static sqlx::migrate::Migrator = &outbox::mysql::MIGRATOR;

    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>> {
        Box::pin(outbox::mysql::migrate(pool))
    }

    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store> {
        std::sync::Arc::new(outbox::mysql::MySqlStore::new(pool))
    }
}

// Times are microseconds since the Unix epoch.
impl Dialect for sqlx::Sqlite {
    fn two_days_before(column: &str) -> String {
        format!("{column} - 2 * 86400 * 1000000")
    }

    fn param(_: usize) -> String {
        "?".into()
    }

    const NOW: &'static str = "1700000000000000";
    const BLOB: &'static str = "BLOB";
    const MIGRATOR: &'static sqlx::migrate::Migrator = &outbox::sqlite::MIGRATOR;

    fn migrate(pool: &sqlx::Pool<Self>) -> futures::future::LocalBoxFuture<'_, outbox::Result<()>> {
        Box::pin(outbox::sqlite::migrate(pool))
    }

    fn store(pool: sqlx::Pool<Self>) -> std::sync::Arc<dyn outbox::Store> {
        std::sync::Arc::new(outbox::sqlite::SqliteStore::new(pool))
    }
}

/// A consumer name no other test uses.
pub fn consumer() -> String {
    format!("c-{}", uuid::Uuid::new_v4().simple())
}

/// The runs of consecutive seqs in `missing` (ascending), as `(from, to)` ranges.
pub fn runs(missing: &[i64]) -> Vec<(i64, i64)> {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &s in missing {
        match runs.last_mut() {
            Some((_, to)) if *to + 1 == s => *to = s,
            _ => runs.push((s, s)),
        }
    }
    runs
}

/// The test handler's failure.
#[derive(Debug)]
pub struct Boom;

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}

impl std::error::Error for Boom {}

/// Set once the suite's metrics recorder is installed: the recorder is process-wide, and every
/// expansion of the suite in a test binary shares it (and the counters below).
pub static RECORDER: Once = Once::new();

fn counters() -> &'static Mutex<HashMap<String, Arc<AtomicU64>>> {
    static COUNTERS: OnceLock<Mutex<HashMap<String, Arc<AtomicU64>>>> = OnceLock::new();
    COUNTERS.get_or_init(Default::default)
}

/// The cell of counter `name` for `consumer`, created at 0.
pub fn counter_cell(name: &str, consumer: &str) -> Arc<AtomicU64> {
    counters()
        .lock()
        .unwrap()
        .entry(format!("{name}/{consumer}"))
        .or_default()
        .clone()
}

/// Counter `name` of `consumer` as counted so far.
pub fn counter_value(name: &str, consumer: &str) -> u64 {
    counter_cell(name, consumer).load(std::sync::atomic::Ordering::SeqCst)
}

#[macro_export]
macro_rules! inbox_suite {
    ($db:ty, $fresh:expr, $fresh_unmigrated:expr) => {
        $crate::__inbox_suite_harness!($db, $fresh, $fresh_unmigrated);
        $crate::__inbox_suite_dedup!();
        $crate::__inbox_suite_gaps!();
        $crate::__inbox_suite_hold!();
        $crate::__inbox_suite_concurrency!();
        $crate::__inbox_suite_retention!();
        $crate::__inbox_suite_sources!();
        $crate::__inbox_suite_upgrade!();
    };
}
