//! What a database must provide to host an inbox: record a message's dedup info on the handler's
//! transaction (filling recorded gaps, parking a message that comes before its predecessor), take
//! parked messages back, and delete expired records in batches. One implementation per sqlx
//! database.

use async_trait::async_trait;

use crate::{Incoming, Parked};

/// A database the inbox can keep its records in: implemented for the sqlx databases enabled by
/// features (`postgres`, `mysql`, `sqlite`).
#[async_trait]
pub trait Backend: sqlx::Database {
    /// Records `msg` for `consumer` on the handler's transaction connection, in as few round trips
    /// as the database allows. Must block on a concurrent, uncommitted record of the same message
    /// (same id, or same source and key) and then answer as if that one had committed first.
    ///
    /// Keyed records are scoped by (consumer, source, key). For a keyed message that skips seqs:
    /// with `hold`, parks it (the key is left as it was) and answers [`Recorded::Parked`], or
    /// [`Recorded::Duplicate`] if it is parked already; without, records the skipped range as an
    /// open gap. For one at or below the key's highest seq that falls in an open gap, cuts its seq
    /// out of the gap and answers [`Recorded::FilledGap`]. The first message of a key with a
    /// source takes over the key's records of the default source, if there are any. A message
    /// with no gap involved costs one statement (two for a key's first message with a source).
    #[doc(hidden)]
    async fn record(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        msg: &Incoming<'_>,
        hold: bool,
    ) -> Result<Recorded, sqlx::Error>;

    /// Takes the parked message `seq` of (consumer, source, key) out of the parked table (None when
    /// it is not parked), on a transaction that holds the key row. The key is left as it is.
    #[doc(hidden)]
    async fn take_parked(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        source: &str,
        key: &str,
        seq: i64,
    ) -> Result<Option<Parked>, sqlx::Error>;

    /// Takes the parked message `seq` of (consumer, source, key) out of the parked table and makes
    /// it the key's highest applied seq, on a transaction that holds the key row (it applied
    /// `seq - 1`, or called [`Backend::lock_key`]). None when that message is not parked; else the
    /// message and the key's highest applied seq before it. Without `skipping`, that must be
    /// `seq - 1`; with it, the seqs between are recorded as an open gap.
    #[doc(hidden)]
    async fn unpark(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        source: &str,
        key: &str,
        seq: i64,
        skipping: bool,
    ) -> Result<Option<(Parked, i64)>, sqlx::Error>;

    /// Locks the key row of (consumer, source, key) for the rest of the transaction. Meant for a
    /// key that has a row (one with parked messages does); one without gets a row with nothing
    /// applied.
    #[doc(hidden)]
    async fn lock_key(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        source: &str,
        key: &str,
    ) -> Result<(), sqlx::Error>;

    /// The lowest seq parked for (consumer, source, key), if any.
    #[doc(hidden)]
    async fn lowest_parked(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        source: &str,
        key: &str,
    ) -> Result<Option<i64>, sqlx::Error>;

    /// Commits the handler's transaction, failing when it can no longer commit (on PostgreSQL a
    /// statement failed in it, 25P02, and its COMMIT would roll back without an error) in the one
    /// round trip of the commit.
    #[doc(hidden)]
    async fn commit_checked(tx: sqlx::Transaction<'_, Self>) -> Result<(), sqlx::Error>;

    /// Fails when the transaction on `conn` can no longer commit: on PostgreSQL, a statement failed
    /// in it (`25P02`); where a failed statement leaves the transaction usable (MySQL, SQLite), it
    /// checks nothing and costs nothing.
    #[doc(hidden)]
    async fn check_usable(conn: &mut <Self as sqlx::Database>::Connection) -> Result<(), sqlx::Error>;

    /// Deletes the parked messages of (consumer, source, key) at or below `seq`, the key's highest
    /// applied seq: copies of messages applied since they were parked (another delivery of one
    /// whose parked copy failed, applied directly; one applied under [`crate::GapPolicy::Accept`]).
    #[doc(hidden)]
    async fn drop_parked_upto(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        source: &str,
        key: &str,
        seq: i64,
    ) -> Result<(), sqlx::Error>;

    /// The highest seq applied for (consumer, source, key), if the key has a row.
    #[doc(hidden)]
    async fn key_seq(
        conn: &mut <Self as sqlx::Database>::Connection,
        consumer: &str,
        source: &str,
        key: &str,
    ) -> Result<Option<i64>, sqlx::Error>;

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
    /// Already processed, or already parked: nothing was written (at most the key's gap
    /// bookkeeping was tidied).
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
    /// Recorded with `hold`: a keyed message above the key's highest seq + 1, now parked until its
    /// predecessor is applied. The key's records are as they were.
    Parked {
        /// The key's highest applied seq (None for a key never seen).
        previous: Option<i64>,
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
        /// A new key of a source whose records of the default source ('') the statement found
        /// (to adopt). Always false where the statement cannot tell (`LEGACY_KEY` asks instead).
        legacy: bool,
    },
    /// Below the key's highest, at or above its `gap_from`: the key row is now locked by this
    /// transaction, and the key's gaps must say whether the seq was skipped.
    BelowTop,
}

mod sql_backend;
pub(crate) use sql_backend::sql_backend;
