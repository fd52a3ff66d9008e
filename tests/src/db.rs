//! Fresh databases for tests: each test gets its own database, migrated, on the real server.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Server URL for PostgreSQL tests. Defaults to the machine's local server.
pub fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new empty PostgreSQL database (not migrated) and a pool on it.
pub async fn fresh_pg_unmigrated() -> PgPool {
    let admin: PgConnectOptions = pg_url().parse().expect("OUTBOX_TEST_PG is a valid URL");
    let name = format!("outbox_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = admin.connect().await.expect("PostgreSQL reachable (is it running?)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
    PgPoolOptions::new()
        .max_connections(40)
        .connect_with(admin.database(&name))
        .await
        .expect("connect to test database")
}

/// A new PostgreSQL database with the outbox schema.
pub async fn fresh_pg() -> PgPool {
    let pool = fresh_pg_unmigrated().await;
    outbox::postgres::migrate(&pool).await.expect("migrate");
    pool
}
