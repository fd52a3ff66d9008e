//! Every SQL statement of the MySQL/MariaDB backend and how its values decode, in one place: the
//! dialect the store body of [`crate::sql_store`] runs.
//!
//! Written for MySQL 8.0.13+ and MariaDB 10.6+ alike: no `RETURNING`, no writable CTEs, `?`
//! placeholders. "Now" is always `UTC_TIMESTAMP(6)` (the database clock, constant within a statement,
//! independent of the session `time_zone`); durations are bound as microseconds.
//!
//! Lease-guarded writes run in a transaction that first reads the lease row `LOCK IN SHARE MODE`:
//! a takeover (which updates that row) waits for them, and they see a takeover that committed first.
//!
//! Locking: InnoDB (REPEATABLE READ) locks every row a locking statement *scans*, with the gap before
//! it, and the optimizer happily scans a whole small table for `pos IN (...)`. So every statement that
//! locks rows of the relay's tables names exactly one row by a unique key (`lane = ? AND pos = ?`,
//! `lane = ?`, `id = ?`): it locks that row and nothing else, never a row or gap an enqueuer needs,
//! which keeps the relay from deadlocking with business transactions. The only scan is the lease
//! candidates' (`SKIP LOCKED`, never waits). The rows of one batch go in one multi-statement round trip.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::Delivered;

/// Keys and owners are stored as bytes (compared byte for byte); they were written from Rust strings.
pub(super) type Text = Vec<u8>;
/// Times are `DATETIME(6)` in UTC.
pub(super) type Time = NaiveDateTime;
/// The backlog's age, in microseconds.
pub(super) type Age = i64;

pub(super) use crate::sql_store::{utf8 as text, utf8_lossy as lossy};

pub(super) fn time(t: Time) -> Result<DateTime<Utc>, String> {
    Ok(t.and_utc())
}

/// Ages are read and durations bound as microseconds.
pub(super) use crate::sql_store::{age_micros as age, micros as span};

/// Write transactions start with the pool's `BEGIN`.
pub(super) const BEGIN_WRITE: Option<&str> = None;

/// The keyed write path, one key: take (or create) the key's counter row, which locks it until the
/// enqueueing transaction ends, and hand the new value back through `LAST_INSERT_ID(expr)`, which the
/// server reports in the statement's OK packet (no extra `SELECT LAST_INSERT_ID()` round trip).
/// Binds: key, key, n, n. Leaves the new last seq of the key in `last_insert_id`.
pub(super) const TAKE_SEQS_ONE_KEY: &str = "\
INSERT INTO outbox_keys (key_hash, `key`, seq) VALUES (UNHEX(SHA2(?, 256)), ?, LAST_INSERT_ID(?)) \
ON DUPLICATE KEY UPDATE seq = LAST_INSERT_ID(seq + ?)";

/// Counters of many keys in one statement (binds: key, key, n per key, keys sorted so that two
/// batches lock them in the same order). The rows stay locked until the enqueueing transaction ends.
pub(super) fn take_seqs(keys: usize) -> String {
    format!(
        "INSERT INTO outbox_keys (key_hash, `key`, seq) VALUES {} \
ON DUPLICATE KEY UPDATE seq = seq + VALUES(seq)",
        repeat("(UNHEX(SHA2(?, 256)), ?, ?)", keys)
    )
}

/// The counters just taken by [`take_seqs`] (binds: one key per row). A plain consistent read: it
/// sees this transaction's own writes, and the rows stay locked by it, so the values are current.
/// (A locking read could scan and lock the whole table.)
pub(super) fn read_seqs(keys: usize) -> String {
    format!(
        "SELECT `key`, seq FROM outbox_keys WHERE key_hash IN ({})",
        repeat("UNHEX(SHA2(?, 256))", keys)
    )
}

/// Message rows, in input order (so per key, pos follows seq). Binds per row: lane, id, topic,
/// payload, headers, available_at (NULL: now + delay), delay in microseconds, key, seq.
pub(super) fn enqueue(rows: usize) -> String {
    format!(
        "INSERT INTO outbox_messages \
(lane, id, topic, payload, headers, created_at, available_at, `key`, seq) VALUES {}",
        repeat(
            "(?, ?, ?, ?, ?, UTC_TIMESTAMP(6), \
COALESCE(?, TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6))), ?, ?)",
            rows
        )
    )
}

/// The lease check of every lease-guarded write (binds: lane, owner, epoch).
pub(super) const LEASE_HELD: &str = "\
SELECT 1 FROM outbox_leases WHERE lane = ? AND owner = ? AND epoch = ? LOCK IN SHARE MODE";

/// Free or expired lanes, locked; lanes another acquirer is taking are skipped (binds: max).
pub(super) const ACQUIRE_CANDIDATES: &str = "\
SELECT lane, epoch FROM outbox_leases \
WHERE owner IS NULL OR expires_at IS NULL OR expires_at < UTC_TIMESTAMP(6) \
ORDER BY lane LIMIT ? FOR UPDATE SKIP LOCKED";

/// Takes one lane locked by [`ACQUIRE_CANDIDATES`] (binds: owner, ttl in microseconds, lane).
pub(super) const ACQUIRE: &str = "\
UPDATE outbox_leases SET owner = ?, epoch = epoch + 1, \
       expires_at = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)) \
WHERE lane = ?";

/// The leases `owner` held a moment ago (binds: owner). Not locking: [`RENEW`] rechecks each.
pub(super) const RENEW_CANDIDATES: &str = "SELECT lane, epoch FROM outbox_leases WHERE owner = ?";

/// Extends one lease if it still holds (binds: ttl in microseconds, lane, owner, epoch): one row
/// affected means held and extended. A takeover bumps the epoch, so this is exact.
pub(super) const RENEW: &str = "\
UPDATE outbox_leases SET expires_at = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)) \
WHERE lane = ? AND owner = ? AND epoch = ?";

// expires_at: when the lane was released (see the PostgreSQL statement).
pub(super) const RELEASE: &str = "\
UPDATE outbox_leases SET owner = NULL, expires_at = UTC_TIMESTAMP(6) WHERE lane = ? AND owner = ? AND epoch = ?";

// Renewal doubles as the relay's heartbeat in outbox_relays (and forgets relays gone for a day).
/// Binds: owner, ttl in microseconds.
pub(super) const HEARTBEAT: &str = "\
INSERT INTO outbox_relays (owner, expires_at) VALUES (?, TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6))) \
ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)";
pub(super) const FORGET_RELAYS: &str = "\
DELETE FROM outbox_relays WHERE expires_at < UTC_TIMESTAMP(6) - INTERVAL 1 DAY";

pub(super) const LEAVE: &str = "DELETE FROM outbox_relays WHERE owner = ?";

pub(super) const PROBE: &str = "SELECT CAST(NULL AS SIGNED), CAST(NULL AS SIGNED)";

pub(super) const LIVE_OWNERS: &str = "SELECT COUNT(*) FROM outbox_relays WHERE expires_at > UTC_TIMESTAMP(6)";

/// A key's row is claimable only if no earlier row of that key is waiting and the key is not parked;
/// with ORDER BY pos (which follows seq per key) the rows taken of each key form a prefix.
///
/// A plain consistent read, on purpose not `FOR UPDATE SKIP LOCKED`: an InnoDB locking read sees the
/// newest committed version of each row it reaches, not the statement's snapshot, so it could skip
/// a key's row whose writer was just committing and then return that key's next row, committed
/// during the scan (breaking per-key order). It would also take next-key locks on the lane under
/// REPEATABLE READ, stalling enqueuers. The snapshot of one statement always holds a prefix of each
/// key, and the lease (checked in the same statement) already gives the lane to one relay.
/// Binds: lane, lane, owner, epoch, JSON array of the positions in flight (left out), limit.
pub(super) const CLAIM: &str = "\
SELECT m.pos, m.id, m.lane, m.topic, m.`key`, m.seq, m.payload, m.headers, m.attempts, m.created_at, \
  (SELECT s.id FROM outbox_source s) AS source \
FROM outbox_messages m \
WHERE m.lane = ? \
  AND EXISTS (SELECT 1 FROM outbox_leases l WHERE l.lane = ? AND l.owner = ? AND l.epoch = ?) \
  AND m.available_at <= UTC_TIMESTAMP(6) \
  AND (m.`key` IS NULL OR ( \
        NOT EXISTS (SELECT 1 FROM outbox_messages p \
                    WHERE p.`key` = m.`key` AND p.seq < m.seq AND p.available_at > UTC_TIMESTAMP(6)) \
    AND NOT EXISTS (SELECT 1 FROM outbox_dead_letters d WHERE d.`key` = m.`key` AND d.parked))) \
  AND m.pos NOT IN (SELECT f.pos FROM JSON_TABLE(?, '$[*]' COLUMNS (pos BIGINT PATH '$')) AS f) \
ORDER BY m.pos LIMIT ?";

/// Deletes published rows of a lane, one statement per row, all in one round trip (a multi-statement
/// text query). With `keep`, each row is first copied to `outbox_published` with its partition and
/// offset (a row already there, published twice, is left alone). The values are integers formatted
/// from Rust integers, so nothing needs quoting.
pub(super) fn mark_published(lane: i32, done: &[Delivered], keep: bool) -> String {
    use std::fmt::Write;
    let mut q = String::new();
    for d in done {
        let (pos, part, off) = (d.pos, d.partition, d.offset);
        if keep {
            let _ = writeln!(
                q,
                "INSERT INTO outbox_published \
(id, topic, `key`, seq, kafka_partition, kafka_offset, created_at, published_at) \
SELECT id, topic, `key`, seq, {part}, {off}, created_at, UTC_TIMESTAMP(6) FROM outbox_messages \
WHERE lane = {lane} AND pos = {pos} \
ON DUPLICATE KEY UPDATE outbox_published.id = outbox_published.id;"
            );
        }
        let _ = writeln!(q, "DELETE FROM outbox_messages WHERE lane = {lane} AND pos = {pos};");
    }
    q
}

/// Binds: error, retry in microseconds, lane, pos.
pub(super) const MARK_FAILED: &str = "\
UPDATE outbox_messages SET attempts = attempts + 1, last_error = ?, \
       available_at = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)) \
WHERE lane = ? AND pos = ?";

/// Binds: error, parked, lane, pos.
pub(super) const DEAD_LETTER_COPY: &str = "\
INSERT INTO outbox_dead_letters \
  (id, lane, pos, topic, `key`, seq, payload, headers, created_at, attempts, error, parked, dead_at) \
SELECT id, lane, pos, topic, `key`, seq, payload, headers, created_at, attempts + 1, ?, ?, UTC_TIMESTAMP(6) \
FROM outbox_messages WHERE lane = ? AND pos = ? \
ON DUPLICATE KEY UPDATE outbox_dead_letters.error = VALUES(error), \
  outbox_dead_letters.parked = VALUES(parked), outbox_dead_letters.attempts = VALUES(attempts), \
  outbox_dead_letters.dead_at = VALUES(dead_at)";

/// Binds: lane, pos.
pub(super) const DEAD_LETTER_DELETE: &str = "DELETE FROM outbox_messages WHERE lane = ? AND pos = ?";

pub(super) const STATUS_BACKLOG: &str = "\
SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(created_at), UTC_TIMESTAMP(6)) FROM outbox_messages";
pub(super) const STATUS_DEAD: &str = "SELECT COUNT(*) FROM outbox_dead_letters";
pub(super) const STATUS_LANES: &str = "\
SELECT lane, owner, epoch, expires_at FROM outbox_leases ORDER BY lane";

pub(super) const DEAD_LETTERS: &str = "\
SELECT id, topic, `key`, seq, attempts, error, parked, dead_at FROM outbox_dead_letters \
ORDER BY dead_at, pos LIMIT ?";

/// Locks the dead letter, so two retries of one id cannot both re-insert it (binds: id).
pub(super) const RETRY_DEAD_LETTER_LOCK: Option<&str> =
    Some("SELECT 1 FROM outbox_dead_letters WHERE id = ? FOR UPDATE");

/// Copies the dead letter back, then deletes it (binds: id), in one transaction.
pub(super) const RETRY_DEAD_LETTER: &[&str] = &[RETRY_DEAD_LETTER_COPY, DISCARD_DEAD_LETTER];

// Back into the outbox with its original position and seq, so a parked key resumes in order.
// An explicit value in an AUTO_INCREMENT column is stored as given. Binds: id.
const RETRY_DEAD_LETTER_COPY: &str = "\
INSERT INTO outbox_messages \
  (lane, pos, id, topic, `key`, seq, payload, headers, created_at, available_at, attempts, last_error) \
SELECT lane, pos, id, topic, `key`, seq, payload, headers, created_at, UTC_TIMESTAMP(6), 0, error \
FROM outbox_dead_letters WHERE id = ?";

pub(super) const DISCARD_DEAD_LETTER: &str = "DELETE FROM outbox_dead_letters WHERE id = ?";

/// Binds: age in microseconds, batch.
pub(super) const CLEANUP_PUBLISHED: &str = "\
DELETE FROM outbox_published \
WHERE published_at < TIMESTAMPADD(MICROSECOND, -?, UTC_TIMESTAMP(6)) \
ORDER BY published_at LIMIT ?";

// Schema migrations, tracked in our own table so the application's sqlx migrator never sees them.
// DDL commits implicitly in MySQL, so runs are serialized with a named lock instead of a transaction.
pub(super) const MIGRATIONS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS outbox_schema_migrations ( \
  version BIGINT NOT NULL PRIMARY KEY, description TEXT NOT NULL, checksum BLOB NOT NULL, \
  installed_on DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4";
pub(super) const MIGRATIONS_LOCK: &str = "SELECT GET_LOCK('outbox_schema_migrations', 600)";
pub(super) const MIGRATIONS_UNLOCK: &str = "SELECT RELEASE_LOCK('outbox_schema_migrations')";
pub(super) const MIGRATIONS_APPLIED: &str = "SELECT version, checksum FROM outbox_schema_migrations";
pub(super) const MIGRATIONS_RECORD: &str = "\
INSERT INTO outbox_schema_migrations (version, description, checksum) VALUES (?, ?, ?)";

/// `n` copies of `item`, comma-separated.
fn repeat(item: &str, n: usize) -> String {
    vec![item; n].join(", ")
}
