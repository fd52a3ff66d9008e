//! The seam between the inbox and the application: a [`Handler`] applies one message with the
//! transaction that also carries the message's dedup record.

use async_trait::async_trait;

use crate::Incoming;

/// Applies one message. It runs inside the transaction [`Inbox::process`](crate::Inbox::process)
/// opened: write through `tx` and the writes commit together with the dedup record, or not at all.
///
/// Under [`GapPolicy::Hold`](crate::GapPolicy::Hold) one transaction can apply several messages of
/// a key: the delivered one, then the parked ones that follow it, each with its own call, in seq
/// order. An error on the delivered one rolls back the transaction; on a parked one, only that
/// one's writes (a savepoint): it stays parked, and the ones before it commit.
///
/// Do not commit or roll back `tx`, and keep side effects outside the database (HTTP calls, e-mails)
/// idempotent or out of the handler: they cannot be rolled back. On PostgreSQL a statement that
/// fails aborts `tx` even if the handler ignores its error (use a savepoint, `tx.begin()`, around
/// a statement allowed to fail): the inbox then refuses the `Ok` with
/// [`InboxError::HandlerAborted`](crate::InboxError::HandlerAborted) and commits nothing.
///
/// ```
/// use async_trait::async_trait;
/// use outbox_inbox::{Handler, Incoming};
/// use sqlx::{Postgres, Transaction};
///
/// struct CountOrders;
///
/// #[async_trait]
/// impl Handler<Postgres> for CountOrders {
///     type Error = sqlx::Error;
///
///     async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
///         sqlx::query("UPDATE order_stats SET n = n + 1 WHERE topic = $1")
///             .bind(msg.topic)
///             .execute(&mut **tx)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Handler<DB: sqlx::Database>: Send + Sync {
    /// The handler's failure. It rolls back the message's writes (see above for parked ones).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies `msg` using `tx`.
    async fn handle(&self, tx: &mut sqlx::Transaction<'_, DB>, msg: &Incoming<'_>) -> Result<(), Self::Error>;
}

// Handlers can be used as trait objects: `process` takes `&H` with `H: ?Sized`.
fn _object_safe<DB: sqlx::Database>(_: &dyn Handler<DB, Error = std::io::Error>) {}
