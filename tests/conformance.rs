//! The store conformance suite against the real PostgreSQL server (a fresh database per test).

mod postgres {
    outbox_tests::conformance_suite!(sqlx::Postgres, async {
        let pool = outbox_tests::db::fresh_pg().await;
        let store: Arc<dyn Store> = Arc::new(outbox::postgres::PgStore::new(pool.clone()));
        (pool, store)
    });
}
