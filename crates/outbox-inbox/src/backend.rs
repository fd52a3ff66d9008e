//! What a database must provide to host an inbox: record a message's dedup info on the handler's
//! transaction (filling recorded gaps), and delete expired records in batches. One implementation
//! per sqlx database.

use async_trait::async_trait;

use crate::Incoming;

/// A database the inbox can keep its records in: implemented for the sqlx databases enabled by
/// features (`postgres`, `mysql`, `sqlite`).
#[async_trait]
pub trait Backend: sqlx::Database {
    /// Records `msg` for `consumer` on the handler's transaction connection, in as few round trips
    /// as the database allows. Must block on a concurrent, uncommitted record of the same message
    /// (same id, or same key) and then answer as if that one had committed first.
    ///
    /// For a keyed message that skips seqs, records the skipped range as an open gap; for one at or
    /// below the key's highest seq that falls in an open gap, cuts its seq out of the gap and answers
    /// [`Recorded::FilledGap`]. A message with no gap involved costs one statement.
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

    /// Deletes at most `batch` open gaps of `consumer` recorded more than `retention_ms` ago, in one
    /// short transaction of its own. Returns how many it deleted.
    #[doc(hidden)]
    async fn delete_expired_gaps(
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
    /// Already processed: nothing was written (at most the key's gap bookkeeping was tidied).
    Duplicate,
    /// Recorded as new. For a keyed message, `previous` is the highest seq applied before (None for
    /// a key never seen); for an unkeyed message it is None. When a keyed message skipped seqs
    /// (`seq > previous + 1`), they were recorded as an open gap.
    New {
        /// The key's highest seq before this message.
        previous: Option<i64>,
    },
    /// A keyed message below the key's highest seq that had been skipped: its seq was in the open
    /// gap `from..=to`, and is now cut out of it. New, and applied late.
    FilledGap {
        /// The gap's first seq, before this message filled its part.
        from: i64,
        /// The gap's last seq, before this message filled its part.
        to: i64,
    },
}

/// What the first statement of [`Backend::record`] found for a keyed message: the only one on the
/// common path (the next seq, a duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyStep {
    /// At or below the key's highest seq and outside the range where it has open gaps: nothing was
    /// written.
    Duplicate,
    /// Recorded as the key's new highest seq (or the first of a new key): `previous` is the highest
    /// before (None for a new key).
    New {
        /// The key's highest seq before this message.
        previous: Option<i64>,
    },
    /// Below the key's highest, at or above its `gap_from`: the key row is now locked by this
    /// transaction, and the key's gaps must say whether the seq was skipped.
    BelowTop,
}

/// Implements [`Backend`] for a database from its statements: the Rust side (what to run after what,
/// what it means) is the same everywhere. Module `$sql` provides:
///
/// - `RECORD_KEYED`, bound (consumer, key, seq): records a keyed message in one statement; how it
///   answers is the first step below.
/// - `RECORD_GAP: Option<&str>`, bound (consumer, key, from, to): records the gap a new message
///   skipped; `None` when `RECORD_KEYED` records it itself.
/// - `FILL_GAP: &[&str]`, each bound (consumer, key, seq), run in order on the key row locked by
///   `RECORD_KEYED`: the first answers the gap `(from_seq, to_seq)` holding seq (no row: a
///   duplicate), all together cut seq out of it and keep the key's `gap_from` up to date.
/// - `RECORD_UNKEYED`, bound (consumer, id): records an unkeyed message unless its id is there.
/// - `DELETE_EXPIRED` and `DELETE_EXPIRED_GAPS`, bound (consumer, retention ms, batch): one batch
///   of the cleanup, one statement in a transaction of its own; the rows deleted are the count.
///
/// The first step, the one statement of the common path, is where databases differ:
///
/// - `sql_backend!(Db, sql)`: the record statements answer with rows (`RETURNING`). `RECORD_KEYED`:
///   no row = duplicate; a row `(prev_seq, seq)` with the message's seq = new (prev_seq: the highest
///   before); with a higher seq = below the highest while the key has open gaps that may hold it.
///   `RECORD_UNKEYED`: one row inserted = new.
/// - `sql_backend!(Db, sql, record_keyed, record_unkeyed)`: the calling module runs them itself and
///   tells what they found, `record_keyed(conn, consumer, key, seq) -> Result<KeyStep, _>` and
///   `record_unkeyed(conn, consumer, id) -> Result<bool, _>` (true: new); for a database whose
///   statements answer otherwise (MySQL: in the OK packet).
macro_rules! sql_backend {
    ($db:ty, $sql:ident) => {
        async fn record_keyed(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            key: &str,
            seq: i64,
        ) -> Result<$crate::backend::KeyStep, sqlx::Error> {
            let row: Option<(Option<i64>, i64)> = sqlx::query_as($sql::RECORD_KEYED)
                .bind(consumer)
                .bind(key)
                .bind(seq)
                .fetch_optional(&mut *conn)
                .await?;
            Ok(match row {
                None => $crate::backend::KeyStep::Duplicate,
                Some((previous, now)) if now == seq => $crate::backend::KeyStep::New { previous },
                Some(_) => $crate::backend::KeyStep::BelowTop,
            })
        }

        async fn record_unkeyed(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            id: ::uuid::Uuid,
        ) -> Result<bool, sqlx::Error> {
            let done = sqlx::query($sql::RECORD_UNKEYED)
                .bind(consumer)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        $crate::backend::sql_backend!($db, $sql, record_keyed, record_unkeyed);
    };
    ($db:ty, $sql:ident, $record_keyed:ident, $record_unkeyed:ident) => {
        #[async_trait::async_trait]
        impl $crate::Backend for $db {
            async fn record(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                msg: &$crate::Incoming<'_>,
            ) -> Result<$crate::Recorded, sqlx::Error> {
                let Some((key, seq)) = msg.key_seq() else {
                    return Ok(if $record_unkeyed(&mut *conn, consumer, msg.id).await? {
                        $crate::Recorded::New { previous: None }
                    } else {
                        $crate::Recorded::Duplicate
                    });
                };
                match $record_keyed(&mut *conn, consumer, key, seq).await? {
                    $crate::backend::KeyStep::Duplicate => Ok($crate::Recorded::Duplicate),
                    $crate::backend::KeyStep::New { previous } => {
                        let from = previous.unwrap_or(0) + 1;
                        if let (Some(record_gap), true) = ($sql::RECORD_GAP, from < seq) {
                            sqlx::query(record_gap)
                                .bind(consumer)
                                .bind(key)
                                .bind(from)
                                .bind(seq - 1)
                                .execute(&mut *conn)
                                .await?;
                        }
                        Ok($crate::Recorded::New { previous })
                    }
                    $crate::backend::KeyStep::BelowTop => {
                        let (first, rest) = $sql::FILL_GAP.split_first().expect("FILL_GAP has a statement");
                        let gap: Option<(i64, i64)> = sqlx::query_as(first)
                            .bind(consumer)
                            .bind(key)
                            .bind(seq)
                            .fetch_optional(&mut *conn)
                            .await?;
                        for statement in rest {
                            sqlx::query(statement)
                                .bind(consumer)
                                .bind(key)
                                .bind(seq)
                                .execute(&mut *conn)
                                .await?;
                        }
                        Ok(match gap {
                            Some((from, to)) => $crate::Recorded::FilledGap { from, to },
                            None => $crate::Recorded::Duplicate,
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

            async fn delete_expired_gaps(
                pool: &sqlx::Pool<$db>,
                consumer: &str,
                retention_ms: i64,
                batch: i64,
            ) -> Result<u64, sqlx::Error> {
                let done = sqlx::query($sql::DELETE_EXPIRED_GAPS)
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
