//! The relay's view of the database: the `Store` seam trait (one implementation per database) and
//! the values that cross it (leases, deliveries, dead letters, status).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use uuid::Uuid;

use crate::{Result, StoredMessage};

/// Number of lanes. Keys hash to lanes (see [`crate::lane_of`]); a relay instance leases lanes and
/// publishes each in order. Part of the stored format: the migrations create one lease row per lane.
pub const LANES: i32 = 32;

/// A relay's hold on one lane. Valid while `epoch` is the lane's current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The lane.
    pub lane: i32,
    /// Grows on every takeover; marks from an older epoch are rejected.
    pub epoch: i64,
    /// The owner (a relay instance id, unique per process).
    pub owner: String,
}

/// The broker's confirmation for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivered {
    /// Position of the row (from [`StoredMessage::pos`]).
    pub pos: i64,
    /// Partition the broker stored it in.
    pub partition: i32,
    /// Offset within that partition; -1 where the broker reports no position.
    pub offset: i64,
}

impl Delivered {
    /// The broker confirmed the row at `pos` without telling where it stored it (partition 0,
    /// offset -1).
    pub fn new(pos: i64) -> Self {
        Delivered {
            pos,
            partition: 0,
            offset: -1,
        }
    }

    /// Where the broker stored it: a Kafka partition and offset, a stream's sequence (partition 0).
    pub fn at(mut self, partition: i32, offset: i64) -> Self {
        self.partition = partition;
        self.offset = offset;
        self
    }
}

/// What the adaptive pace's probe ([`Store::probe`]) reads of the other clients' work, where the
/// database tells (`None` where it does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProbeCounts {
    /// Every client's finished transactions, committed and rolled back, read-only ones too
    /// (PostgreSQL's `pg_stat_database`: each connection adds its count about once a second).
    pub finished: Option<i64>,
    /// Transaction ids handed out so far: every transaction that writes takes one the moment it
    /// writes (PostgreSQL's `txid_current()`), so this count is never late.
    pub writes: Option<i64>,
    /// Of those, the ones this store's own statements took so far, this probe's included, where
    /// the store counts them: the relay's marks of several lanes may share one statement, so the
    /// relay's own count of its calls would say more.
    pub own_writes: Option<i64>,
    /// The transactions this store's own statements finished so far (those that write and those
    /// that only read, such as claims), this probe's included, where the store counts them: the
    /// claims of several lanes share statements too.
    pub own_finished: Option<i64>,
}

impl ProbeCounts {
    /// The counts of a probe.
    pub fn new(finished: Option<i64>, writes: Option<i64>) -> Self {
        ProbeCounts {
            finished,
            writes,
            own_writes: None,
            own_finished: None,
        }
    }

    /// With the store's own count of the transaction ids its statements took.
    pub fn own_writes(mut self, own_writes: Option<i64>) -> Self {
        self.own_writes = own_writes;
        self
    }

    /// With the store's own count of the transactions its statements finished.
    pub fn own_finished(mut self, own_finished: Option<i64>) -> Self {
        self.own_finished = own_finished;
        self
    }
}

/// One lane's lease as `status` shows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LaneInfo {
    /// Lane.
    pub lane: i32,
    /// Current owner, if any.
    pub owner: Option<String>,
    /// Current epoch.
    pub epoch: i64,
    /// When the lease expires; for a lane without an owner, when it was released (`None`: never
    /// held, or released before releases kept their time).
    pub expires_at: Option<DateTime<Utc>>,
}

impl LaneInfo {
    /// Lane `lane` at `epoch`, held by `owner` (none when released or never taken) until
    /// `expires_at`.
    pub fn new(lane: i32, owner: Option<String>, epoch: i64, expires_at: Option<DateTime<Utc>>) -> Self {
        LaneInfo {
            lane,
            owner,
            epoch,
            expires_at,
        }
    }
}

/// Backlog summary.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Status {
    /// Rows waiting to be published.
    pub pending: i64,
    /// Age of the oldest pending row.
    pub oldest_pending_age: Option<Duration>,
    /// Rows in the dead-letter table.
    pub dead_letters: i64,
    /// Lanes, their owners and expiry.
    pub lanes: Vec<LaneInfo>,
}

impl Status {
    /// `pending` rows waiting (the oldest for `oldest_pending_age`), `dead_letters` rows in the
    /// dead-letter table, and the lanes' leases.
    pub fn new(pending: i64, oldest_pending_age: Option<Duration>, dead_letters: i64, lanes: Vec<LaneInfo>) -> Self {
        Status {
            pending,
            oldest_pending_age,
            dead_letters,
            lanes,
        }
    }

    /// Lanes that no relay holds now (no owner, or its lease has expired): nothing publishes their
    /// messages until a relay takes them.
    pub fn unowned_lanes(&self) -> usize {
        let now = Utc::now();
        self.lanes
            .iter()
            .filter(|l| l.owner.is_none() || l.expires_at.is_none_or(|e| e <= now))
            .count()
    }
}

/// A message that could not be published, with why.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message id.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<String>,
    /// Per-key seq.
    pub seq: Option<i64>,
    /// Attempts made.
    pub attempts: i32,
    /// The error that dead-lettered it.
    pub error: String,
    /// True when it blocks its key (policy `park`).
    pub parked: bool,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// Message `id` for `topic`, dead-lettered at `dead_at` because of `error`. Unkeyed, no
    /// attempts, not parked until the setters below say otherwise.
    pub fn new(id: Uuid, topic: impl Into<String>, error: impl Into<String>, dead_at: DateTime<Utc>) -> Self {
        DeadLetter {
            id,
            topic: topic.into(),
            key: None,
            seq: None,
            attempts: 0,
            error: error.into(),
            parked: false,
            dead_at,
        }
    }

    /// Sets the message's ordering key and its sequence number within it.
    pub fn key(mut self, key: impl Into<String>, seq: i64) -> Self {
        self.key = Some(key.into());
        self.seq = Some(seq);
        self
    }

    /// Sets the number of publish attempts made.
    pub fn attempts(mut self, attempts: i32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Sets whether it blocks its key (policy `park`).
    pub fn parked(mut self, parked: bool) -> Self {
        self.parked = parked;
        self
    }
}

/// The relay's hot path: leases, claims and the outcome of each publish. One implementation per
/// database; the engine knows nothing else about SQL. Every write checks the caller's lease epoch in
/// the same statement, so a relay that lost its lane cannot change anything in it.
///
/// No method has a default body: a wrapper (a timing or metrics decorator) that forgets one fails
/// to compile instead of silently dropping it. The engine also reads the backlog and deletes kept
/// rows ([`StoreAdmin`]), hence the supertrait; a wake-up on commit is a capability
/// ([`Store::wakeups`]).
#[async_trait]
pub trait Store: StoreAdmin {
    /// Takes up to `max` lanes that are free or whose lease expired, bumping each lane's epoch.
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>>;
    /// Heartbeat: records `owner` as a live relay for `ttl` and extends every lease it still
    /// holds; returns those leases (a lane taken over is absent).
    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>>;
    /// Gives a lane back (only if the lease is still current).
    async fn release(&self, lease: &Lease) -> Result<()>;
    /// Number of live relays (heartbeat not expired), holding lanes or not.
    async fn live_owners(&self) -> Result<usize>;
    /// The smallest transaction that commits the way a service's does (on PostgreSQL it takes a
    /// transaction id, so its commit waits for the WAL flush like any write): how long it takes
    /// is the adaptive pace's signal of a contended database. Returns the database's counts of
    /// every client's transactions, where it keeps them (see [`ProbeCounts`]).
    async fn probe(&self) -> Result<ProbeCounts>;
    /// Removes `owner` from the live relays (graceful shutdown), so the others rebalance at once.
    async fn leave(&self, owner: &str) -> Result<()>;
    /// Up to `limit` ready rows of the lane, in per-key order, never a row of a key whose earlier
    /// row is waiting (backoff, delay) or parked, leaving out the rows at positions `in_flight` (a
    /// batch still being published, so the relay can claim its next batch while the broker
    /// confirms the current one; `&[]` otherwise). No cursor: rows committed late are found too.
    async fn claim(&self, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>>;
    /// Records that the broker has these rows (deletes them, or moves them to the published table).
    /// Fails with [`crate::Error::StaleLease`] when the lease is no longer current.
    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()>;
    /// Records a failed attempt: attempts + 1, the error, and no retry before `retry_in` from now.
    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()>;
    /// Moves a row to the dead-letter table. `park` keeps its key blocked until an operator acts.
    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()>;
    /// The database's wake-up on commit, if it has one (PostgreSQL LISTEN/NOTIFY); `None`: the
    /// relay polls (and wakes on [`crate::Outbox::local_wakeup`] when it shares the writers' process).
    fn wakeups(&self) -> Option<&dyn Wakeups>;
}

/// A database that tells the relay which lanes got new rows when they commit.
#[async_trait]
pub trait Wakeups: Send + Sync {
    /// A stream of lanes that got new rows; every lane once as it begins, and again each time it
    /// listens again after a lost connection: a commit before then may have told nobody.
    async fn listen(&self) -> Result<BoxStream<'static, i32>>;
    /// Tells writers whether the lane's relay is idle, waiting for a wake-up (true), or busy
    /// draining (false): writers notify only idle lanes.
    async fn set_idle(&self, lease: &Lease, idle: bool) -> Result<()>;
    /// Which of `lanes` hold a row that is ready now at a position beyond the lane's `after`
    /// (the lane's batches in flight end there; 0 looks at every row): one cheap query for all the
    /// lanes a relay keeps watching while their flag says busy (and writers send no NOTIFY).
    async fn ready_lanes(&self, lanes: &[(i32, i64)]) -> Result<Vec<i32>>;
    /// The ids of the transactions open now, asked right after a lane's flag said idle: a writer
    /// that read the flag as busy (and sends no NOTIFY) is one of them until it ends, unless its
    /// transaction took its id only after this (a first write whose statement read the flag before
    /// and was held up past this call), whose row waits for the lane's poll. By default none:
    /// such rows wait for the poll.
    async fn open_transactions(&self) -> Result<Vec<i64>> {
        Ok(Vec::new())
    }
    /// Which of the transactions `ids` (from [`Wakeups::open_transactions`]) are still open.
    async fn still_open(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let _ = ids;
        Ok(Vec::new())
    }
}

/// What an operator (and the engine's metrics and cleanup loops) asks of the outbox database:
/// backlog, dead letters, retention.
#[async_trait]
pub trait StoreAdmin: Send + Sync + 'static {
    /// Backlog, lanes and dead-letter count.
    async fn status(&self) -> Result<Status>;
    /// Dead letters, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>>;
    /// Puts a dead letter back into the outbox (attempts reset). False if there was no such id.
    async fn retry_dead_letter(&self, id: Uuid) -> Result<bool>;
    /// Deletes a dead letter for good. False if there was no such id.
    async fn discard_dead_letter(&self, id: Uuid) -> Result<bool>;
    /// Deletes up to `batch` published rows older than `older_than` (only when they are kept).
    async fn cleanup_published(&self, older_than: Duration, batch: usize) -> Result<u64>;
}

#[allow(dead_code)]
fn _object_safe(_: &dyn Store) {}

// Lets the relay run on a store chosen at run time (`Arc<dyn Store>`, e.g. from a URL scheme).
#[async_trait]
impl<T: Store + ?Sized> Store for std::sync::Arc<T> {
    async fn acquire(&self, owner: &str, max: usize, ttl: Duration) -> Result<Vec<Lease>> {
        (**self).acquire(owner, max, ttl).await
    }
    async fn renew(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>> {
        (**self).renew(owner, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        (**self).release(lease).await
    }
    async fn live_owners(&self) -> Result<usize> {
        (**self).live_owners().await
    }
    async fn probe(&self) -> Result<ProbeCounts> {
        (**self).probe().await
    }
    async fn leave(&self, owner: &str) -> Result<()> {
        (**self).leave(owner).await
    }
    async fn claim(&self, lease: &Lease, limit: usize, in_flight: &[i64]) -> Result<Vec<StoredMessage>> {
        (**self).claim(lease, limit, in_flight).await
    }
    async fn mark_published(&self, lease: &Lease, done: &[Delivered]) -> Result<()> {
        (**self).mark_published(lease, done).await
    }
    async fn mark_failed(&self, lease: &Lease, pos: i64, error: &str, retry_in: Duration) -> Result<()> {
        (**self).mark_failed(lease, pos, error, retry_in).await
    }
    async fn dead_letter(&self, lease: &Lease, pos: i64, error: &str, park: bool) -> Result<()> {
        (**self).dead_letter(lease, pos, error, park).await
    }
    fn wakeups(&self) -> Option<&dyn Wakeups> {
        (**self).wakeups()
    }
}

#[async_trait]
impl<T: StoreAdmin + ?Sized> StoreAdmin for std::sync::Arc<T> {
    async fn status(&self) -> Result<Status> {
        (**self).status().await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        (**self).dead_letters(limit).await
    }
    async fn retry_dead_letter(&self, id: Uuid) -> Result<bool> {
        (**self).retry_dead_letter(id).await
    }
    async fn discard_dead_letter(&self, id: Uuid) -> Result<bool> {
        (**self).discard_dead_letter(id).await
    }
    async fn cleanup_published(&self, older_than: Duration, batch: usize) -> Result<u64> {
        (**self).cleanup_published(older_than, batch).await
    }
}
