//! What a database must provide to host an inbox: record a message's dedup info on the handler's
//! transaction (filling recorded gaps), and delete expired records in batches. One implementation
//! per sqlx database.

use async_trait::async_trait;

use crate::Incoming;

/// A database the inbox can keep its records in: implemented for the sqlx databases enabled by
/// features (`postgres`, `sqlite`).
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

/// Implements [`Backend`] for a database from its statements: the Rust side is the same everywhere.
/// Module `$sql` provides:
///
/// - `RECORD_KEYED`, bound (consumer, key, seq): no row = duplicate; a row `(prev_seq, seq)` with
///   the message's seq = new (prev_seq: the highest before); with a higher seq = below the highest
///   while the key has open gaps that may hold it.
/// - `RECORD_GAP: Option<&str>`, bound (consumer, key, from, to): records the gap a new message
///   skipped; `None` when `RECORD_KEYED` records it itself.
/// - `FILL_GAP: &[&str]`, each bound (consumer, key, seq), run in order on the key row locked by
///   `RECORD_KEYED`: the first answers the gap `(from_seq, to_seq)` holding seq (no row: a
///   duplicate), all together cut seq out of it and keep the key's `gap_from` up to date.
/// - `RECORD_UNKEYED`, bound (consumer, id): one row inserted = new.
/// - `DELETE_EXPIRED` and `DELETE_EXPIRED_GAPS`, bound (consumer, retention ms, batch).
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
                        let row: Option<(Option<i64>, i64)> = sqlx::query_as($sql::RECORD_KEYED)
                            .bind(consumer)
                            .bind(key)
                            .bind(seq)
                            .fetch_optional(&mut *conn)
                            .await?;
                        match row {
                            None => Ok($crate::Recorded::Duplicate),
                            Some((previous, now)) if now == seq => {
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
                            Some(_) => {
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
