//! Fresh databases for tests: each test gets its own database, migrated, on the real server.

use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, MySqlPool, PgPool, SqlitePool};

/// Server URL for PostgreSQL tests. Defaults to the machine's local server.
pub fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new empty database on the server `admin` reaches (`server` names it), and a pool of 40 on it
/// (`on(admin, name)`: the options for the new database).
async fn fresh_database<DB: sqlx::Database>(
    admin: <DB::Connection as Connection>::Options,
    server: &str,
    on: impl FnOnce(<DB::Connection as Connection>::Options, &str) -> <DB::Connection as Connection>::Options,
) -> sqlx::Pool<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    let name = format!("outbox_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = admin
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{server} reachable (is it running?): {e:?}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(40)
        .connect_with(on(admin, &name))
        .await
        .expect("connect to test database")
}

/// A new empty PostgreSQL database (not migrated) and a pool on it.
pub async fn fresh_pg_unmigrated() -> PgPool {
    let admin: PgConnectOptions = pg_url().parse().expect("OUTBOX_TEST_PG is a valid URL");
    fresh_database(admin, "PostgreSQL", PgConnectOptions::database).await
}

/// Runs `sql` (statements without parameters) on `e`, failing the test on an error.
pub async fn exec<'e, E: sqlx::Executor<'e>>(e: E, sql: &'e str) {
    sqlx::raw_sql(sql).execute(e).await.unwrap();
}

/// The one value `sql` (a statement without parameters) selects on `pool`, failing the test on an
/// error or when it selects no row.
pub async fn scalar<DB, T>(pool: &sqlx::Pool<DB>, sql: &str) -> T
where
    DB: sqlx::Database,
    (T,): for<'r> sqlx::FromRow<'r, DB::Row>,
    T: Send + Unpin,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

/// Commits `msgs` in one transaction, each with [`outbox::enqueue`]; what it answered for each.
pub async fn commit_each<DB: outbox::Backend>(
    pool: &sqlx::Pool<DB>,
    msgs: impl IntoIterator<Item = outbox::Message>,
) -> Vec<outbox::Enqueued> {
    let mut tx = pool.begin().await.unwrap();
    let mut out = Vec::new();
    for m in msgs {
        out.push(outbox::enqueue(&mut tx, &m).await.unwrap());
    }
    tx.commit().await.unwrap();
    out
}

/// Commits `msgs` in one transaction with [`outbox::enqueue_batch`]; what it answered.
pub async fn commit_batch<DB: outbox::Backend>(
    pool: &sqlx::Pool<DB>,
    msgs: &[outbox::Message],
) -> Vec<outbox::Enqueued> {
    let mut tx = pool.begin().await.unwrap();
    let out = outbox::enqueue_batch(&mut tx, msgs).await.unwrap();
    tx.commit().await.unwrap();
    out
}

/// Waits for writer tasks that each return the ids they committed; all of them together.
pub async fn all_committed(
    writers: Vec<tokio::task::JoinHandle<std::collections::HashSet<uuid::Uuid>>>,
) -> std::collections::HashSet<uuid::Uuid> {
    let mut all = std::collections::HashSet::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    all
}

/// Enqueues `msgs` in one transaction and rolls it back: none of them may ever be published.
pub async fn roll_back<DB: outbox::Backend>(pool: &sqlx::Pool<DB>, msgs: &[outbox::Message]) {
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue_batch(&mut tx, msgs).await.unwrap();
    tx.rollback().await.unwrap();
}

/// A new PostgreSQL database with the outbox schema.
pub async fn fresh_pg() -> PgPool {
    let pool = fresh_pg_unmigrated().await;
    outbox::postgres::migrate(&pool).await.expect("migrate");
    pool
}

/// [`fresh_pg`] and a store on it.
pub async fn fresh_pg_store() -> (PgPool, outbox::postgres::PgStore) {
    let pool = fresh_pg().await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    (pool, store)
}

/// Server URL for MySQL/MariaDB tests. Defaults to the machine's local MariaDB.
pub fn mysql_url() -> String {
    std::env::var("OUTBOX_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A new empty MySQL/MariaDB database (not migrated) and a pool on it.
pub async fn fresh_mysql_unmigrated() -> MySqlPool {
    let admin: MySqlConnectOptions = mysql_url().parse().expect("OUTBOX_TEST_MYSQL is a valid URL");
    fresh_database(admin, "MySQL/MariaDB", MySqlConnectOptions::database).await
}

/// A new MySQL/MariaDB database with the outbox schema.
pub async fn fresh_mysql() -> MySqlPool {
    let pool = fresh_mysql_unmigrated().await;
    outbox::mysql::migrate(&pool).await.expect("migrate");
    pool
}

/// A new empty SQLite database file in the temp directory (not migrated), in WAL mode with a busy
/// timeout (writers wait for each other instead of failing), and a pool on it.
pub async fn fresh_sqlite_unmigrated() -> SqlitePool {
    let path = std::env::temp_dir().join(format!("outbox_test_{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let opts: SqliteConnectOptions = url.parse().expect("valid SQLite URL");
    let opts = opts
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .expect("open test database")
}

/// A new SQLite database file with the outbox schema.
pub async fn fresh_sqlite() -> SqlitePool {
    let pool = fresh_sqlite_unmigrated().await;
    outbox::sqlite::migrate(&pool).await.expect("migrate");
    pool
}

/// A new in-memory SQLite database with the outbox schema. An in-memory database lives in one
/// connection, so the pool has exactly one, kept open for the pool's life: every user of the pool
/// (business transactions, the store) takes turns on it.
pub async fn fresh_sqlite_memory() -> SqlitePool {
    let opts: SqliteConnectOptions = "sqlite::memory:".parse().expect("valid SQLite URL");
    let pool = SqlitePoolOptions::new()
        .min_connections(1)
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(opts)
        .await
        .expect("open in-memory database");
    outbox::sqlite::migrate(&pool).await.expect("migrate");
    pool
}

/// A directory with the application's own sqlx migrations: an `orders` table.
pub fn app_migrations() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("app-migrations-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("20240101000000_orders.sql"),
        "CREATE TABLE orders (id BIGINT PRIMARY KEY);",
    )
    .unwrap();
    dir
}

/// Adds a second application migration.
pub fn more_app_migrations(dir: &std::path::Path) {
    std::fs::write(
        dir.join("20240102000000_more.sql"),
        "ALTER TABLE orders ADD COLUMN note TEXT;",
    )
    .unwrap();
}

/// The migration tests every database runs: `migration_tests!(module, fresh_unmigrated, [versions])`
/// with the `outbox::module` whose `migrate` and `MIGRATOR` are tested, the `outbox_tests::db`
/// function that opens an empty database, and the versions the outbox's migrations leave.
#[macro_export]
macro_rules! migration_tests {
    ($module:ident, $fresh_unmigrated:ident, $versions:expr) => {
        #[tokio::test]
        async fn migrations_coexist_with_the_applications_own_sqlx_migrator() {
            use sqlx::migrate::Migrator;
            let pool = outbox_tests::db::$fresh_unmigrated().await;
            let dir = outbox_tests::db::app_migrations();
            let app = Migrator::new(dir.as_path()).await.unwrap();

            app.run(&pool).await.unwrap();
            outbox::$module::migrate(&pool).await.unwrap();
            // Each side runs again, in both orders, without seeing the other's rows.
            app.run(&pool).await.unwrap();
            outbox::$module::migrate(&pool).await.unwrap();
            outbox_tests::db::more_app_migrations(&dir);
            let app = Migrator::new(dir.as_path()).await.unwrap();
            app.run(&pool).await.unwrap();
            outbox::$module::migrate(&pool).await.unwrap();

            let app_versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(app_versions, vec![20240101000000, 20240102000000]);
            let ours: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox_schema_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
            let embedded: Vec<i64> = outbox::$module::MIGRATOR.iter().map(|m| m.version).collect();
            assert_eq!(ours, embedded);
            assert_eq!(ours, $versions);
            // Both schemas are usable in one transaction.
            let mut tx = pool.begin().await.unwrap();
            $crate::db::exec(&mut *tx, "INSERT INTO orders (id, note) VALUES (1, 'x')").await;
            outbox::enqueue(&mut tx, &outbox::Message::new("t", "x"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            std::fs::remove_dir_all(dir).ok();
        }

        #[tokio::test]
        async fn concurrent_migrations_do_not_conflict() {
            let pool = outbox_tests::db::$fresh_unmigrated().await;
            let runs = (0..4).map(|_| outbox::$module::migrate(&pool));
            for r in futures::future::join_all(runs).await {
                r.unwrap();
            }
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_schema_migrations")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(n, outbox::$module::MIGRATOR.iter().count() as i64);
        }
    };
}

/// A service busy on the database until stopped (or dropped): eight writers on a pool of their
/// own, each inserting rows into a table of its own (`service_rows`), one at a time. The adaptive
/// pace sees it by the transaction ids it takes.
pub struct Service {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Service {
    pub async fn writing(pool: &sqlx::PgPool) -> Service {
        exec(pool, "CREATE TABLE service_rows (x INT)").await;
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers = (0..8)
            .map(|_| {
                let (pool, stop) = (own.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        exec(&pool, "INSERT INTO service_rows VALUES (1)").await;
                    }
                })
            })
            .collect();
        Service { stop, writers }
    }

    /// Stops the writers and waits for them (a writer that failed fails the test here).
    pub async fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in std::mem::take(&mut self.writers) {
            w.await.unwrap();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.writers.iter().for_each(tokio::task::JoinHandle::abort);
    }
}
