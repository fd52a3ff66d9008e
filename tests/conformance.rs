//! The store conformance suite against the real PostgreSQL and MySQL/MariaDB servers and SQLite
//! (a fresh database per test).

mod postgres {
    outbox_tests::conformance_suite!(sqlx::Postgres, outbox_tests::db::fresh_pg());
}

mod mysql {
    outbox_tests::conformance_suite!(sqlx::MySql, outbox_tests::db::fresh_mysql());
}

// SQLite has one writer at a time: `single_writer` replaces the one scenario that needs two open
// write transactions (see `late_commit_with_lower_id_is_still_claimed` in the suite).
mod sqlite {
    outbox_tests::conformance_suite!(sqlx::Sqlite, outbox_tests::db::fresh_sqlite(), single_writer);
}

mod sqlite_memory {
    outbox_tests::conformance_suite!(sqlx::Sqlite, outbox_tests::db::fresh_sqlite_memory(), single_writer);
}
