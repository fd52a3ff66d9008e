//! Which embedded migrations still need to run. Each backend tracks applied versions in its own
//! `outbox_schema_migrations` table, never in `_sqlx_migrations`, so an application's own sqlx
//! migrator and ours never see each other's rows.

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
