//! The relay store written once for every sqlx database: operator actions, lease bookkeeping and
//! lease-guarded writes, over a database's dialect module (its statements and how its values decode).
//!
//! What really differs between databases (PostgreSQL's CTEs and NOTIFY, MySQL's guarded transaction
//! and multi-statement mark, SQLite's single writer) stays in each database's `store.rs` and `sql.rs`;
//! these macros hold the Rust that is the same everywhere, as `sqlx::migrate::Migrator` holds the
//! migration loop over each driver's statements.

use std::time::Duration;

use crate::Lease;

/// A count bound as a SQL integer (a limit, a batch size).
/// The longest error text kept with a row, in bytes.
const ERROR_TEXT_MAX: usize = 4096;

/// An error text as a row keeps it (`last_error`, a dead letter's `error`): NUL, which
/// PostgreSQL's text refuses, replaced by U+FFFD, and cut to [`ERROR_TEXT_MAX`] bytes. Whatever a
/// broker answers, storing it cannot fail (a store write that fails every time would hold its lane).
pub(crate) fn error_text(error: &str) -> std::borrow::Cow<'_, str> {
    if error.len() <= ERROR_TEXT_MAX && !error.contains('\0') {
        return error.into();
    }
    let mut end = error.len().min(ERROR_TEXT_MAX);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < error.len() { "…" } else { "" };
    format!("{}{cut}", error[..end].replace('\0', "\u{fffd}")).into()
}

pub(crate) fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A duration bound as whole milliseconds.
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Text read as bytes (MySQL and SQLite): a key or an owner, checked to be UTF-8.
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn utf8(t: Vec<u8>) -> Result<String, String> {
    String::from_utf8(t).map_err(|e| e.to_string())
}

/// Text read as bytes, anything not UTF-8 replaced (for display: owners).
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn utf8_lossy(t: Vec<u8>) -> String {
    String::from_utf8_lossy(&t).into_owned()
}

/// A duration bound as whole microseconds.
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// An age read as microseconds (negative, from clocks apart: zero).
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn age_micros(us: i64) -> Duration {
    Duration::from_micros(us.max(0) as u64)
}

/// The leases `owner` holds, from `(lane, epoch)` rows.
pub(crate) fn leases(owner: &str, rows: Vec<(i32, i64)>) -> Vec<Lease> {
    rows.into_iter()
        .map(|(lane, epoch)| Lease {
            lane,
            epoch,
            owner: owner.to_owned(),
        })
        .collect()
}

/// Implements [`crate::Store`] and [`crate::StoreAdmin`] for `$store`, a struct with a `pool: Pool<$db>`
/// field, from the dialect module `$sql`.
///
/// The dialect provides:
/// - `BEGIN_WRITE: Option<&str>`: how a write transaction starts (`None`: the pool's `begin`).
/// - `Text`, the type keys and owners come back as, with `text(Text) -> Result<String, String>`
///   (an error marks the row corrupt) and `lossy(Text) -> String` (for display).
/// - `Time`, the type times come back as, with `time(Time) -> Result<DateTime<Utc>, String>`.
/// - `Age`, the type of the backlog's age, with `age(Age) -> Duration`.
/// - `span(Duration) -> i64`: a duration as its statements bind it.
/// - `RELEASE`, bound (lane, owner, epoch); `LEAVE`, bound (owner); `LIVE_OWNERS`, a count;
///   `PROBE`, the pace's smallest committing transaction, answering the database's count of
///   finished transactions (NULL where there is none).
/// - `STATUS_BACKLOG`, answering (count, `Option<Age>`); `STATUS_DEAD`, a count; `STATUS_LANES`,
///   answering (lane, `Option<Text>` owner, epoch, `Option<Time>` expiry) per lane.
/// - `DEAD_LETTERS`, bound (limit), answering (id, topic, `Option<Text>` key, seq, attempts, error,
///   parked, `Time` dead_at).
/// - `RETRY_DEAD_LETTER: &[&str]`, each bound (id), run in order: the rows the last one affects
///   answer. One statement runs alone; more run in a write transaction, which first runs
///   `RETRY_DEAD_LETTER_LOCK: Option<&str>`, bound (id), when there is one: no row, no retry.
/// - `DISCARD_DEAD_LETTER`, bound (id); `CLEANUP_PUBLISHED`, bound (`span(age)`, batch).
///
/// The invoking module defines the rest of the hot path as async fns that take the store and then the
/// trait method's arguments (`acquire`, `renew`, `claim`, `mark_published`, `mark_failed`,
/// `dead_letter`; [`guarded_writes!`] defines the last two), and `fn wakeups(&$store) -> Option<&dyn
/// Wakeups>`.
#[allow(unused_macros)] // used by the backends compiled in
macro_rules! store {
    ($store:ty, $db:ty, $sql:ident) => {
        #[async_trait::async_trait]
        impl $crate::Store for $store {
            async fn acquire(
                &self,
                owner: &str,
                max: usize,
                ttl: std::time::Duration,
            ) -> $crate::Result<Vec<$crate::Lease>> {
                acquire(self, owner, max, ttl).await
            }

            async fn renew(&self, owner: &str, ttl: std::time::Duration) -> $crate::Result<Vec<$crate::Lease>> {
                renew(self, owner, ttl).await
            }

            async fn release(&self, lease: &$crate::Lease) -> $crate::Result<()> {
                sqlx::query($sql::RELEASE)
                    .bind(lease.lane)
                    .bind(&lease.owner)
                    .bind(lease.epoch)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn live_owners(&self) -> $crate::Result<usize> {
                let n: i64 = sqlx::query_scalar($sql::LIVE_OWNERS)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(n as usize)
            }

            async fn probe(&self) -> $crate::Result<$crate::ProbeCounts> {
                // Counted before it runs: its transaction id is in the count it reads.
                let (own_writes, own_finished) = count_probe(self);
                let (finished, writes): (Option<i64>, Option<i64>) =
                    sqlx::query_as($sql::PROBE).fetch_one(&self.pool).await?;
                Ok($crate::ProbeCounts::new(finished, writes)
                    .own_writes(own_writes)
                    .own_finished(own_finished))
            }

            async fn leave(&self, owner: &str) -> $crate::Result<()> {
                sqlx::query($sql::LEAVE).bind(owner).execute(&self.pool).await?;
                Ok(())
            }

            async fn claim(
                &self,
                lease: &$crate::Lease,
                limit: usize,
                in_flight: &[i64],
            ) -> $crate::Result<Vec<$crate::StoredMessage>> {
                claim(self, lease, limit, in_flight).await
            }

            async fn mark_published(&self, lease: &$crate::Lease, done: &[$crate::Delivered]) -> $crate::Result<()> {
                mark_published(self, lease, done).await
            }

            async fn mark_failed(
                &self,
                lease: &$crate::Lease,
                pos: i64,
                error: &str,
                retry_in: std::time::Duration,
            ) -> $crate::Result<()> {
                mark_failed(self, lease, pos, &$crate::sql_store::error_text(error), retry_in).await
            }

            async fn dead_letter(
                &self,
                lease: &$crate::Lease,
                pos: i64,
                error: &str,
                park: bool,
            ) -> $crate::Result<()> {
                dead_letter(self, lease, pos, &$crate::sql_store::error_text(error), park).await
            }

            fn wakeups(&self) -> Option<&dyn $crate::Wakeups> {
                wakeups(self)
            }
        }

        #[async_trait::async_trait]
        impl $crate::StoreAdmin for $store {
            async fn status(&self) -> $crate::Result<$crate::Status> {
                let (pending, age): (i64, Option<$sql::Age>) =
                    sqlx::query_as($sql::STATUS_BACKLOG).fetch_one(&self.pool).await?;
                let dead_letters: i64 = sqlx::query_scalar($sql::STATUS_DEAD)
                    .fetch_one(&self.pool)
                    .await?;
                let lanes: Vec<(i32, Option<$sql::Text>, i64, Option<$sql::Time>)> =
                    sqlx::query_as($sql::STATUS_LANES).fetch_all(&self.pool).await?;
                Ok($crate::Status {
                    pending,
                    oldest_pending_age: age.map($sql::age),
                    dead_letters,
                    lanes: lanes
                        .into_iter()
                        .map(|(lane, owner, epoch, expires_at)| $crate::LaneInfo {
                            lane,
                            owner: owner.map($sql::lossy),
                            epoch,
                            expires_at: expires_at.and_then(|t| $sql::time(t).ok()),
                        })
                        .collect(),
                })
            }

            async fn dead_letters(&self, limit: usize) -> $crate::Result<Vec<$crate::DeadLetter>> {
                // Topic and key are for display here: a dead letter another writer gave bytes that
                // are not text (SQLite keeps them) shows them lossily instead of failing the list.
                type Row = (
                    uuid::Uuid,
                    $sql::Text,
                    Option<$sql::Text>,
                    Option<i64>,
                    i32,
                    String,
                    bool,
                    $sql::Time,
                );
                let rows: Vec<Row> = sqlx::query_as($sql::DEAD_LETTERS)
                    .bind($crate::sql_store::count(limit))
                    .fetch_all(&self.pool)
                    .await?;
                let corrupt = |id, column, e| $crate::Error::CorruptRow {
                    id,
                    reason: format!("{column}: {e}"),
                };
                rows.into_iter()
                    .map(|(id, topic, key, seq, attempts, error, parked, dead_at)| {
                        Ok($crate::DeadLetter {
                            id,
                            topic: $sql::lossy(topic),
                            key: key.map($sql::lossy),
                            seq,
                            attempts,
                            error,
                            parked,
                            dead_at: $sql::time(dead_at).map_err(|e| corrupt(id, "dead_at", e))?,
                        })
                    })
                    .collect()
            }

            async fn retry_dead_letter(&self, id: uuid::Uuid) -> $crate::Result<bool> {
                if let [statement] = $sql::RETRY_DEAD_LETTER {
                    let r = sqlx::query(statement).bind(id).execute(&self.pool).await?;
                    return Ok(r.rows_affected() > 0);
                }
                let mut tx = match $sql::BEGIN_WRITE {
                    Some(begin) => self.pool.begin_with(begin).await?,
                    None => self.pool.begin().await?,
                };
                if let Some(lock) = $sql::RETRY_DEAD_LETTER_LOCK {
                    if sqlx::query(lock)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_none()
                    {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                }
                let mut affected = 0;
                for statement in $sql::RETRY_DEAD_LETTER {
                    affected = sqlx::query(statement)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(affected > 0)
            }

            async fn discard_dead_letter(&self, id: uuid::Uuid) -> $crate::Result<bool> {
                let r = sqlx::query($sql::DISCARD_DEAD_LETTER)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected() > 0)
            }

            async fn cleanup_published(&self, older_than: std::time::Duration, batch: usize) -> $crate::Result<u64> {
                let r = sqlx::query($sql::CLEANUP_PUBLISHED)
                    .bind($sql::span(older_than))
                    .bind($crate::sql_store::count(batch))
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected())
            }
        }

        // Keeps the database type named in the invocation honest: the pool must be of it.
        const _: fn(&$store) -> &sqlx::Pool<$db> = |s| &s.pool;
    };
}

/// Defines `guarded`, `mark_failed` and `dead_letter` for `$store` (a struct with a `pool: Pool<$db>`
/// field) on a database whose lease-guarded writes run in a transaction that first checks the lease,
/// from the dialect module `$sql`:
/// - `BEGIN_WRITE: Option<&str>` and `span(Duration) -> i64`, as for [`store!`];
/// - `LEASE_HELD`, bound (lane, owner, epoch): a row while the lease is current, read so that no
///   takeover of the lane can commit until the transaction ends;
/// - `MARK_FAILED`, bound (error, `span(retry_in)`, lane, pos);
/// - `DEAD_LETTER_COPY`, bound (error, park, lane, pos), then `DEAD_LETTER_DELETE`, bound (lane, pos).
#[allow(unused_macros)] // used by the backends compiled in
macro_rules! guarded_writes {
    ($store:ty, $db:ty, $sql:ident) => {
        /// Opens a write transaction in which the lease holds, or fails with `StaleLease` (nothing
        /// changed). Until the transaction ends, no takeover of the lane can commit.
        async fn guarded(store: &$store, lease: &$crate::Lease) -> $crate::Result<sqlx::Transaction<'static, $db>> {
            let mut tx = match $sql::BEGIN_WRITE {
                Some(begin) => store.pool.begin_with(begin).await?,
                None => store.pool.begin().await?,
            };
            let held = sqlx::query($sql::LEASE_HELD)
                .bind(lease.lane)
                .bind(&lease.owner)
                .bind(lease.epoch)
                .fetch_optional(&mut *tx)
                .await?;
            if held.is_none() {
                tx.rollback().await?;
                return Err($crate::Error::StaleLease {
                    lane: lease.lane,
                    epoch: lease.epoch,
                });
            }
            Ok(tx)
        }

        /// Runs `statements` in order in a transaction in which the lease holds ([`guarded`]), then
        /// commits.
        async fn run_guarded<'q>(
            store: &$store,
            lease: &$crate::Lease,
            statements: Vec<sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>>,
        ) -> $crate::Result<()> {
            let mut tx = guarded(store, lease).await?;
            for statement in statements {
                statement.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        }

        async fn mark_failed(
            store: &$store,
            lease: &$crate::Lease,
            pos: i64,
            error: &str,
            retry_in: std::time::Duration,
        ) -> $crate::Result<()> {
            let mark = sqlx::query($sql::MARK_FAILED)
                .bind(error)
                .bind($sql::span(retry_in))
                .bind(lease.lane)
                .bind(pos);
            run_guarded(store, lease, vec![mark]).await
        }

        async fn dead_letter(
            store: &$store,
            lease: &$crate::Lease,
            pos: i64,
            error: &str,
            park: bool,
        ) -> $crate::Result<()> {
            let copy = sqlx::query($sql::DEAD_LETTER_COPY)
                .bind(error)
                .bind(park)
                .bind(lease.lane)
                .bind(pos);
            let delete = sqlx::query($sql::DEAD_LETTER_DELETE).bind(lease.lane).bind(pos);
            run_guarded(store, lease, vec![copy, delete]).await
        }
    };
}

/// Defines `acquire` for `$store` (a struct with a `pool` field) on a database whose
/// `$sql::ACQUIRE`, bound (owner, max, `span(ttl)`), takes the free lanes and answers their
/// (lane, epoch) rows in one statement; `$leases(owner, rows)` makes the leases of them.
#[allow(unused_macros)] // used by the backends compiled in
macro_rules! acquire_in_one_statement {
    ($store:ty, $sql:ident, $leases:path) => {
        async fn acquire(
            store: &$store,
            owner: &str,
            max: usize,
            ttl: std::time::Duration,
        ) -> $crate::Result<Vec<$crate::Lease>> {
            let rows: Vec<(i32, i64)> = sqlx::query_as($sql::ACQUIRE)
                .bind(owner)
                .bind(max as i64)
                .bind($sql::span(ttl))
                .fetch_all(&store.pool)
                .await?;
            Ok($leases(owner, rows))
        }
    };
}

#[allow(unused_imports)] // used by the backends compiled in
pub(crate) use {acquire_in_one_statement, guarded_writes, store};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_lose_their_nuls_and_are_cut_on_a_char_boundary() {
        assert!(matches!(error_text("plain"), std::borrow::Cow::Borrowed("plain")));
        assert_eq!(error_text("a\0b"), "a\u{fffd}b");
        // 'é' is two bytes: 4095 of them leave the cut in the middle of one.
        let long = format!("x{}", "é".repeat(3000));
        let cut = error_text(&long);
        assert!(
            cut.len() <= ERROR_TEXT_MAX + "…".len() && cut.ends_with("é…"),
            "{}",
            cut.len()
        );
    }
}
