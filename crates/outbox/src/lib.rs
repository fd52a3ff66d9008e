#![doc = include_str!("../README.md")]
// Without a database feature only the shared types are compiled.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]

mod backoff;
pub mod db_error;
mod error;
mod local;
mod message;
mod migrate;
pub mod millis;
pub mod observed;
mod polled;
mod publisher;
pub mod redact;
mod sql_store;
mod store;
pub mod trace;

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use async_trait::async_trait;
use sqlx::Transaction;

pub use backoff::{Backoff, InvalidBackoff};
pub use error::{Error, Result};
pub use local::LocalWakeup;
pub use message::{
    lane_of, validate_topic, Enqueued, Message, StoredMessage, DEFAULT_MAX_PAYLOAD, HEADER_ID, HEADER_KEY, HEADER_SEQ,
    HEADER_SOURCE, HEADER_TRACEPARENT, RESERVED_HEADER_PREFIX,
};
pub use publisher::{FailureKind, PublishError, Publisher};
pub use store::{DeadLetter, Delivered, LaneInfo, Lease, ProbeCounts, Status, Store, StoreAdmin, Wakeups, LANES};

/// A database the outbox can write into: implemented for the sqlx databases enabled by features.
#[async_trait]
pub trait Backend: sqlx::Database {
    /// The longest key the database can index, in bytes ([`Error::KeyTooLong`] beyond it).
    #[doc(hidden)]
    const MAX_KEY_BYTES: usize = usize::MAX;
    /// Inserts validated messages on the caller's transaction connection.
    #[doc(hidden)]
    async fn insert(
        conn: &mut <Self as sqlx::Database>::Connection,
        msgs: &[Message],
        opts: &Options,
    ) -> Result<Vec<Enqueued>>;
}

/// Write-path settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Largest payload accepted, in bytes. Defaults to 1 MiB ([`DEFAULT_MAX_PAYLOAD`]).
    pub max_payload: usize,
    /// PostgreSQL: send NOTIFY in the enqueueing transaction so a listening relay wakes at commit.
    /// Defaults to true.
    pub notify: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_payload: DEFAULT_MAX_PAYLOAD,
            notify: true,
        }
    }
}

/// The write path with settings, and the in-process wake-up of an embedded relay.
///
/// `outbox::enqueue` uses the defaults; keep an `Outbox` when you change them or embed the relay
/// (then [`Outbox::commit`] wakes the lanes the transaction wrote to right after the commit, on
/// every database).
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    opts: Options,
    local: LocalWakeup,
}

impl Outbox {
    /// Default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Largest payload accepted, in bytes. Defaults to 1 MiB.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.opts.max_payload = bytes;
        self
    }

    /// Send PostgreSQL NOTIFY on enqueue. Defaults to true.
    pub fn notify(mut self, on: bool) -> Self {
        self.opts.notify = on;
        self
    }

    /// Enqueues `msg` in the caller's open transaction. Nothing is visible to the relay until the
    /// transaction commits; on rollback the message never existed.
    ///
    /// On an error, roll the transaction back (and run it again whole when
    /// [`Error::is_retryable`]): PostgreSQL aborts the transaction itself, but on MySQL and SQLite
    /// a failed call may already have taken the keys' seqs in it, and a message enqueued again in
    /// the same transaction would leave a gap in its key's seqs (a consumer under
    /// `GapPolicy::Hold` waits for it).
    pub async fn enqueue<DB: Backend>(&self, tx: &mut Transaction<'_, DB>, msg: &Message) -> Result<Enqueued> {
        let mut out = self.enqueue_batch(tx, std::slice::from_ref(msg)).await?;
        Ok(out.remove(0))
    }

    /// Enqueues many messages in one round trip. Per key, they get consecutive seqs in slice order.
    /// If any message is invalid, nothing is written.
    pub async fn enqueue_batch<DB: Backend>(
        &self,
        tx: &mut Transaction<'_, DB>,
        msgs: &[Message],
    ) -> Result<Vec<Enqueued>> {
        let out = insert(tx, msgs, &self.opts).await?;
        self.local.enqueued(out.iter().map(|e| e.lane));
        Ok(out)
    }

    /// Commits `tx`, then wakes a relay embedded in this process: the lanes this task enqueued
    /// into since its last `commit` (none for a transaction that enqueued nothing; code outside any
    /// tokio task counts as one task). A transaction enqueued in one task and committed in another
    /// is found by NOTIFY or the relay's poll instead.
    pub async fn commit<DB: sqlx::Database>(&self, tx: Transaction<'_, DB>) -> Result<()> {
        tx.commit().await?;
        self.local.committed();
        Ok(())
    }

    /// The in-process wake-up [`Outbox::commit`] fires; give it to an embedded relay
    /// (`Relay::wake_on`). Until this is called, enqueues record nothing for it.
    pub fn local_wakeup(&self) -> LocalWakeup {
        self.local.listen()
    }
}

async fn insert<DB: Backend>(tx: &mut Transaction<'_, DB>, msgs: &[Message], opts: &Options) -> Result<Vec<Enqueued>> {
    for m in msgs {
        m.validate(opts.max_payload, DB::MAX_KEY_BYTES)?;
    }
    if msgs.len() > 1 {
        let mut ids = std::collections::HashSet::with_capacity(msgs.len());
        if let Some(m) = msgs.iter().find(|m| !ids.insert(m.id)) {
            return Err(Error::DuplicateId(m.id));
        }
    }
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    DB::insert(&mut **tx, msgs, opts).await
}

/// Enqueues `msg` in the caller's open transaction with default settings. On an error, roll the
/// transaction back ([`Outbox::enqueue`] says why).
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> outbox::Result<()> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
/// outbox::enqueue(&mut tx, &outbox::Message::new("order.placed.v1", "42").key("order-42")).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn enqueue<DB: Backend>(tx: &mut Transaction<'_, DB>, msg: &Message) -> Result<Enqueued> {
    let mut out = insert(tx, std::slice::from_ref(msg), &Options::default()).await?;
    Ok(out.remove(0))
}

/// Enqueues many messages in one round trip with default settings.
pub async fn enqueue_batch<DB: Backend>(tx: &mut Transaction<'_, DB>, msgs: &[Message]) -> Result<Vec<Enqueued>> {
    insert(tx, msgs, &Options::default()).await
}
