//! What a database must provide to host an inbox: record a message's dedup info on the handler's
//! transaction, and delete expired records in batches. One implementation per sqlx database.

use async_trait::async_trait;

use crate::Incoming;

/// A database the inbox can keep its records in: implemented for the sqlx databases enabled by
/// features (`postgres`).
#[async_trait]
pub trait Backend: sqlx::Database {
    /// Records `msg` for `consumer` on the handler's transaction connection, in as few round trips
    /// as the database allows. Must block on a concurrent, uncommitted record of the same message
    /// (same id, or same key) and then answer as if that one had committed first.
    #[doc(hidden)]
    async fn record(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        msg: &Incoming<'_>,
    ) -> Result<Recorded, sqlx::Error>;

    /// Deletes at most `batch` unkeyed records of `consumer` older than `retention_ms`, in one short
    /// transaction of its own. Returns how many it deleted.
    #[doc(hidden)]
    async fn delete_expired(
        pool: &sqlx::Pool<Self>,
        consumer: &str,
        retention_ms: i64,
        batch: i64,
    ) -> Result<u64, sqlx::Error>;
}

/// What [`Backend::record`] found. Facts only: the inbox decides what a gap means.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Already processed: nothing was written.
    Duplicate,
    /// Recorded as new. For a keyed message, `previous` is the highest seq applied before (None for
    /// a key never seen); for an unkeyed message it is None.
    New {
        /// The key's highest seq before this message.
        previous: Option<i64>,
    },
}

/// Implements [`Backend`] for a database from its three statements (module `$sql` with
/// `RECORD_KEYED`, `RECORD_UNKEYED`, `DELETE_EXPIRED`): the Rust side is the same everywhere.
macro_rules! sql_backend {
    ($db:ty, $sql:ident) => {
        #[async_trait::async_trait]
        impl $crate::Backend for $db {
            async fn record(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                msg: &$crate::Incoming<'_>,
            ) -> Result<$crate::Recorded, sqlx::Error> {
                match msg.key_seq() {
                    Some((key, seq)) => {
                        let row: Option<(Option<i64>,)> = sqlx::query_as($sql::RECORD_KEYED)
                            .bind(consumer)
                            .bind(key)
                            .bind(seq)
                            .fetch_optional(&mut *conn)
                            .await?;
                        Ok(match row {
                            None => $crate::Recorded::Duplicate,
                            Some((previous,)) => $crate::Recorded::New { previous },
                        })
                    }
                    None => {
                        let done = sqlx::query($sql::RECORD_UNKEYED)
                            .bind(consumer)
                            .bind(msg.id)
                            .execute(&mut *conn)
                            .await?;
                        Ok(if done.rows_affected() == 1 {
                            $crate::Recorded::New { previous: None }
                        } else {
                            $crate::Recorded::Duplicate
                        })
                    }
                }
            }

            async fn delete_expired(
                pool: &sqlx::Pool<$db>,
                consumer: &str,
                retention_ms: i64,
                batch: i64,
            ) -> Result<u64, sqlx::Error> {
                let done = sqlx::query($sql::DELETE_EXPIRED)
                    .bind(consumer)
                    .bind(retention_ms)
                    .bind(batch)
                    .execute(pool)
                    .await?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(crate) use sql_backend;
