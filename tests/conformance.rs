//! The store conformance suite against the real PostgreSQL and MySQL/MariaDB servers and SQLite
//! (a fresh database per test).

mod postgres {
    outbox_tests::conformance_suite!(sqlx::Postgres, async {
        let pool = outbox_tests::db::fresh_pg().await;
        let store: Arc<dyn Store> = Arc::new(outbox::postgres::PgStore::new(pool.clone()));
        (pool, store)
    });
}

mod mysql {
    outbox_tests::conformance_suite!(sqlx::MySql, async {
        let pool = outbox_tests::db::fresh_mysql().await;
        let store: Arc<dyn Store> = Arc::new(outbox::mysql::MySqlStore::new(pool.clone()));
        (pool, store)
    });
}

// SQLite has one writer at a time: `single_writer` replaces the one scenario that needs two open
// write transactions (see `late_commit_with_lower_id_is_still_claimed` in the suite).
mod sqlite {
    outbox_tests::conformance_suite!(
        sqlx::Sqlite,
        async {
            let pool = outbox_tests::db::fresh_sqlite().await;
            let store: Arc<dyn Store> = Arc::new(outbox::sqlite::SqliteStore::new(pool.clone()));
            (pool, store)
        },
        single_writer
    );
}

mod sqlite_memory {
    outbox_tests::conformance_suite!(
        sqlx::Sqlite,
        async {
            let pool = outbox_tests::db::fresh_sqlite_memory().await;
            let store: Arc<dyn Store> = Arc::new(outbox::sqlite::SqliteStore::new(pool.clone()));
            (pool, store)
        },
        single_writer
    );
}
