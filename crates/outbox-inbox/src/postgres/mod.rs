//! PostgreSQL inbox: the dedup record is one upsert (keyed) or one insert (unkeyed) on the
//! handler's transaction; cleanup deletes expired records by batches of row ids.

mod sql;

crate::backend::sql_backend!(sqlx::Postgres, sql);
