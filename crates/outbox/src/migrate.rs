//! The migration loop, written once: which embedded migrations still need to run, and running them
//! over a database's statements (each backend only takes its lock). Each backend tracks applied
//! versions in its own `outbox_schema_migrations` table, never in `_sqlx_migrations`, so an
//! application's own sqlx migrator and ours never see each other's rows.

use sqlx::migrate::{MigrateError, Migration, Migrator};

/// The migrations of `migrator` not yet in `applied` (version, checksum), in order. A changed
/// checksum of an applied migration is an error: the schema on disk is not what we shipped.
pub(crate) fn pending<'m>(
    migrator: &'m Migrator,
    applied: &[(i64, Vec<u8>)],
) -> Result<Vec<&'m Migration>, MigrateError> {
    let mut todo = Vec::new();
    for m in migrator.iter().filter(|m| m.migration_type.is_up_migration()) {
        match applied.iter().find(|(v, _)| *v == m.version) {
            Some((_, sum)) if sum.as_slice() != &*m.checksum => return Err(MigrateError::VersionMismatch(m.version)),
            Some(_) => {}
            None => todo.push(m),
        }
    }
    Ok(todo)
}

/// Defines `apply_migrations(conn)` for `$db`: creates the tracking table, then runs the migrations
/// of `$migrator` not applied yet, in order, each recorded as it runs. The caller holds the
/// database's migration lock (a transaction, an advisory or named lock) around it. The dialect module
/// `$sql` provides `MIGRATIONS_TABLE`, `MIGRATIONS_APPLIED` (answering version, checksum) and
/// `MIGRATIONS_RECORD`, bound (version, description, checksum).
#[allow(unused_macros)] // used by the backends compiled in
macro_rules! apply_migrations {
    ($db:ty, $sql:ident, $migrator:expr) => {
        async fn apply_migrations(conn: &mut <$db as sqlx::Database>::Connection) -> $crate::Result<()> {
            sqlx::query($sql::MIGRATIONS_TABLE).execute(&mut *conn).await?;
            let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as($sql::MIGRATIONS_APPLIED).fetch_all(&mut *conn).await?;
            for m in $crate::migrate::pending(&$migrator, &applied)? {
                // A string without arguments runs as a simple (multi-statement) query on every
                // driver. Not `sqlx::raw_sql`: its future is not `Send` for every lifetime, which
                // kept `migrate` out of spawned tasks (test below).
                sqlx::Executor::execute(&mut *conn, &*m.sql).await?;
                sqlx::query($sql::MIGRATIONS_RECORD)
                    .bind(m.version)
                    .bind(&*m.description)
                    .bind(&*m.checksum)
                    .execute(&mut *conn)
                    .await?;
                tracing::info!(version = m.version, description = %m.description, "applied outbox migration");
            }
            Ok(())
        }

        /// Runs the pending migrations in `tx`, which holds the migration lock, and commits them
        /// together (the databases whose DDL is transactional).
        #[allow(dead_code)] // MySQL runs them outside a transaction
        async fn apply_and_commit(mut tx: sqlx::Transaction<'_, $db>) -> $crate::Result<()> {
            apply_migrations(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }
    };
}

#[allow(unused_imports)] // used by the backends compiled in
pub(crate) use apply_migrations;

#[cfg(test)]
mod tests {
    /// A service migrates in a spawned task: the migration futures must be `Send` for any lifetime.
    #[allow(dead_code)]
    fn migrations_can_be_spawned() {
        fn spawned<F: std::future::Future + Send + 'static>(_: F) {}
        #[cfg(feature = "postgres")]
        spawned(async {
            let pool = sqlx::PgPool::connect_lazy("postgres://unused").expect("lazy pool");
            crate::postgres::migrate(&pool).await
        });
        #[cfg(feature = "mysql")]
        spawned(async {
            let pool = sqlx::MySqlPool::connect_lazy("mysql://unused").expect("lazy pool");
            crate::mysql::migrate(&pool).await
        });
        #[cfg(feature = "sqlite")]
        spawned(async {
            let pool = sqlx::SqlitePool::connect_lazy("sqlite::memory:").expect("lazy pool");
            crate::sqlite::migrate(&pool).await
        });
    }
}
