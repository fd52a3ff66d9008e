//! Every SQL statement of the SQLite backend and how its values decode, in one place: the dialect
//! the store body of [`crate::sql_store`] runs.
//!
//! Times are INTEGER microseconds since the Unix epoch. "Now" is SQLite's own clock, `julianday('now')`
//! (millisecond resolution, available on every SQLite), scaled to microseconds; durations are bound
//! as microseconds.
//!
//! SQLite has one writer at a time, and a statement or a write transaction (`BEGIN IMMEDIATE`) runs
//! alone: lease-guarded writes check the lease and write inside one such transaction, so no takeover
//! can come between. There is no `FOR UPDATE` / `SKIP LOCKED` and none is needed: a claim is one read
//! of one snapshot (WAL), and the lease already gives the lane to a single relay.

use chrono::{DateTime, Utc};

/// Keys and owners are read as bytes: SQLite keeps whatever type a writer gave a column (a BLOB,
/// text that is not UTF-8), and a row this crate did not write is then marked corrupt instead of
/// failing the whole claim.
pub(super) type Text = Vec<u8>;
/// Times are INTEGER microseconds since the Unix epoch.
pub(super) type Time = i64;
/// The backlog's age, in microseconds.
pub(super) type Age = i64;

pub(super) use crate::sql_store::{utf8 as text, utf8_lossy as lossy};

pub(super) fn time(us: Time) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| format!("out of range: {us}"))
}

/// Ages are read and durations bound as microseconds.
pub(super) use crate::sql_store::{age_micros as age, micros as span};

/// The database clock in microseconds since the Unix epoch.
macro_rules! now {
    () => {
        "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)"
    };
}

/// Takes seqs for many keys in one statement and returns each key's last seq (binds per key: key,
/// count). Keys are given sorted.
pub(super) fn take_seqs(keys: usize) -> String {
    format!(
        "INSERT INTO outbox_keys (key, seq) VALUES {} \
ON CONFLICT (key) DO UPDATE SET seq = seq + excluded.seq RETURNING key, seq",
        repeat("(?, ?)", keys)
    )
}

/// Message rows, in input order (so per key, pos follows seq). Binds per row: lane, id, topic,
/// payload, headers, available_at (NULL: now + delay), delay in microseconds, key, seq.
pub(super) fn enqueue(rows: usize) -> String {
    format!(
        "INSERT INTO outbox_messages \
(lane, id, topic, payload, headers, created_at, available_at, key, seq) VALUES {}",
        repeat(
            concat!("(?, ?, ?, ?, ?, ", now!(), ", COALESCE(?, ", now!(), " + ?), ?, ?)"),
            rows
        )
    )
}

/// The lease check of every lease-guarded write (binds: lane, owner, epoch).
pub(super) const LEASE_HELD: &str = "SELECT 1 FROM outbox_leases WHERE lane = ?1 AND owner = ?2 AND epoch = ?3";

/// Binds: owner, max, ttl in microseconds. One statement, so atomic.
pub(super) const ACQUIRE: &str = concat!(
    "UPDATE outbox_leases SET owner = ?1, epoch = epoch + 1, expires_at = ",
    now!(),
    " + ?3 \
WHERE lane IN (SELECT lane FROM outbox_leases \
               WHERE owner IS NULL OR expires_at IS NULL OR expires_at < ",
    now!(),
    " ORDER BY lane LIMIT ?2) \
RETURNING lane, epoch"
);

/// Binds: owner, ttl in microseconds.
pub(super) const RENEW: &str = concat!(
    "UPDATE outbox_leases SET expires_at = ",
    now!(),
    " + ?2 WHERE owner = ?1 RETURNING lane, epoch"
);

// expires_at: when the lane was released (see the PostgreSQL statement).
pub(super) const RELEASE: &str = concat!(
    "UPDATE outbox_leases SET owner = NULL, expires_at = ",
    now!(),
    " WHERE lane = ?1 AND owner = ?2 AND epoch = ?3"
);

// Renewal doubles as the relay's heartbeat in outbox_relays (and forgets relays gone for a day).
/// Binds: owner, ttl in microseconds.
pub(super) const HEARTBEAT: &str = concat!(
    "INSERT INTO outbox_relays (owner, expires_at) VALUES (?1, ",
    now!(),
    " + ?2) ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at"
);
pub(super) const FORGET_RELAYS: &str = concat!(
    "DELETE FROM outbox_relays WHERE expires_at < ",
    now!(),
    " - 86400000000"
);

pub(super) const LEAVE: &str = "DELETE FROM outbox_relays WHERE owner = ?1";

pub(super) const PROBE: &str = "SELECT CAST(NULL AS INTEGER), CAST(NULL AS INTEGER)";

pub(super) const LIVE_OWNERS: &str = concat!("SELECT COUNT(*) FROM outbox_relays WHERE expires_at > ", now!());

// SQLite keeps whatever type a writer gave a value, so the claim reads every column of a row
// another writer may have stored in a shape of its own in a way that cannot fail to decode (text as
// bytes, a number where there is none) and says in `bad` which columns were not what this crate
// writes: the row is then claimed and marked corrupt (dead-lettered), not the whole claim failed. A
// time that is not a number is never due by comparison (text sorts after numbers), so such a row is
// claimed at once and does not hold its key's later messages.
macro_rules! id_ok {
    () => {
        "(typeof(m.id) = 'blob' AND length(m.id) = 16)"
    };
}
macro_rules! seq_ok {
    () => {
        "typeof(m.seq) IN ('integer', 'null')"
    };
}
macro_rules! attempts_ok {
    () => {
        "typeof(m.attempts) = 'integer'"
    };
}
macro_rules! time_ok {
    ($column:literal) => {
        concat!("typeof(", $column, ") IN ('integer', 'real')")
    };
}
/// `<column> column: <its type>, not <what>; ` when `ok` is false, '' otherwise.
macro_rules! bad {
    ($column:literal, $ok:expr, $what:literal) => {
        concat!(
            "CASE WHEN ",
            $ok,
            " THEN '' ELSE '",
            $column,
            " column: ' || typeof(m.",
            $column,
            ") || ', not ",
            $what,
            "; ' END"
        )
    };
}

/// A key's row is claimable only if no earlier row of that key is waiting and the key is not parked;
/// with ORDER BY pos (which follows seq per key) the rows taken of each key form a prefix. "Now" is
/// computed once (materialized): rows come out over several steps, and SQLite's clock may move
/// between steps. Binds: lane, owner, epoch, limit, JSON array of the positions in flight (left out).
pub(super) const CLAIM: &str = concat!(
    "WITH c(now) AS MATERIALIZED (SELECT ",
    now!(),
    ") \
SELECT m.pos, CASE WHEN ",
    id_ok!(),
    " THEN m.id ELSE zeroblob(16) END AS id, m.lane, \
  CAST(m.topic AS BLOB) AS topic, CAST(m.key AS BLOB) AS key, \
  CASE WHEN ",
    seq_ok!(),
    " THEN m.seq END AS seq, CAST(m.payload AS BLOB) AS payload, CAST(m.headers AS BLOB) AS headers, \
  CASE WHEN ",
    attempts_ok!(),
    " THEN m.attempts ELSE 0 END AS attempts, \
  CASE WHEN ",
    time_ok!("m.created_at"),
    " THEN CAST(m.created_at AS INTEGER) ELSE 0 END AS created_at, \
  NULLIF(",
    bad!("id", id_ok!(), "a 16-byte blob"),
    " || ",
    bad!("seq", seq_ok!(), "an integer"),
    " || ",
    bad!("attempts", attempts_ok!(), "an integer"),
    " || ",
    bad!("created_at", time_ok!("m.created_at"), "a number"),
    " || ",
    bad!("available_at", time_ok!("m.available_at"), "a number"),
    ", '') AS bad, \
  (SELECT s.id FROM outbox_source s) AS source \
FROM c, outbox_messages m \
WHERE m.lane = ?1 \
  AND EXISTS (SELECT 1 FROM outbox_leases l WHERE l.lane = ?1 AND l.owner = ?2 AND l.epoch = ?3) \
  AND (m.available_at <= c.now OR NOT ",
    time_ok!("m.available_at"),
    ") \
  AND (m.key IS NULL OR ( \
        NOT EXISTS (SELECT 1 FROM outbox_messages p \
                    WHERE p.key = m.key AND p.seq < m.seq AND p.available_at > c.now AND ",
    time_ok!("p.available_at"),
    ") \
    AND NOT EXISTS (SELECT 1 FROM outbox_dead_letters d WHERE d.key = m.key AND d.parked))) \
  AND m.pos NOT IN (SELECT value FROM json_each(?5)) \
ORDER BY m.pos LIMIT ?4"
);

/// Binds: lane, JSON array of positions.
pub(super) const DELETE_PUBLISHED: &str = "\
DELETE FROM outbox_messages WHERE lane = ?1 AND pos IN (SELECT value FROM json_each(?2))";

/// Binds: lane, JSON array of `[pos, partition, offset]`. A row already there is left alone.
pub(super) const KEEP_PUBLISHED: &str = concat!(
    "INSERT INTO outbox_published \
  (id, topic, key, seq, kafka_partition, kafka_offset, created_at, published_at) \
SELECT m.id, m.topic, m.key, m.seq, json_extract(r.value, '$[1]'), json_extract(r.value, '$[2]'), \
       m.created_at, ",
    now!(),
    " FROM json_each(?2) AS r JOIN outbox_messages m ON m.pos = json_extract(r.value, '$[0]') \
WHERE m.lane = ?1 \
ON CONFLICT (id) DO NOTHING"
);

/// Binds: error, retry in microseconds, lane, pos.
pub(super) const MARK_FAILED: &str = concat!(
    "UPDATE outbox_messages SET attempts = attempts + 1, last_error = ?1, available_at = ",
    now!(),
    " + ?2 WHERE lane = ?3 AND pos = ?4"
);

/// Binds: error, parked, lane, pos. A row whose id is not one (another writer's, see the claim)
/// gets a new one, so the dead letter can be retried or discarded by id.
pub(super) const DEAD_LETTER_COPY: &str = concat!(
    "INSERT INTO outbox_dead_letters \
  (id, lane, pos, topic, key, seq, payload, headers, created_at, attempts, error, parked, dead_at) \
SELECT CASE WHEN ",
    id_ok!(),
    " THEN m.id ELSE randomblob(16) END, \
  lane, pos, topic, key, seq, payload, headers, created_at, attempts + 1, ?1, ?2, ",
    now!(),
    " FROM outbox_messages m WHERE lane = ?3 AND pos = ?4 \
ON CONFLICT (id) DO UPDATE SET error = excluded.error, parked = excluded.parked, \
  attempts = excluded.attempts, dead_at = excluded.dead_at"
);

/// Binds: lane, pos.
pub(super) const DEAD_LETTER_DELETE: &str = "DELETE FROM outbox_messages WHERE lane = ?1 AND pos = ?2";

pub(super) const STATUS_BACKLOG: &str = concat!("SELECT COUNT(*), ", now!(), " - MIN(created_at) FROM outbox_messages");
pub(super) const STATUS_DEAD: &str = "SELECT COUNT(*) FROM outbox_dead_letters";
pub(super) const STATUS_LANES: &str = "SELECT lane, owner, epoch, expires_at FROM outbox_leases ORDER BY lane";

pub(super) const DEAD_LETTERS: &str = "\
SELECT id, CAST(topic AS BLOB), CAST(key AS BLOB), CASE WHEN typeof(seq) = 'integer' THEN seq END, attempts, \
  error, parked, dead_at FROM outbox_dead_letters \
ORDER BY dead_at, pos LIMIT ?1";

// Back into the outbox with its original position and seq, so a parked key resumes in order
// (AUTOINCREMENT never hands that position to another row). Binds: id.
const RETRY_DEAD_LETTER_COPY: &str = concat!(
    "INSERT INTO outbox_messages \
  (lane, pos, id, topic, key, seq, payload, headers, created_at, available_at, attempts, last_error) \
SELECT lane, pos, id, topic, key, seq, payload, headers, created_at, ",
    now!(),
    ", 0, error FROM outbox_dead_letters WHERE id = ?1"
);

pub(super) const DISCARD_DEAD_LETTER: &str = "DELETE FROM outbox_dead_letters WHERE id = ?1";

/// Copies the dead letter back, then deletes it (binds: id), in one write transaction.
pub(super) const RETRY_DEAD_LETTER: &[&str] = &[RETRY_DEAD_LETTER_COPY, DISCARD_DEAD_LETTER];
/// The write transaction is the lock: SQLite has one writer.
pub(super) const RETRY_DEAD_LETTER_LOCK: Option<&str> = None;

/// Binds: age in microseconds, batch.
pub(super) const CLEANUP_PUBLISHED: &str = concat!(
    "DELETE FROM outbox_published WHERE id IN ( \
  SELECT id FROM outbox_published WHERE published_at < ",
    now!(),
    " - ?1 ORDER BY published_at LIMIT ?2)"
);

// Schema migrations, tracked in our own table so the application's sqlx migrator never sees them.
// They run in one `BEGIN IMMEDIATE` transaction (SQLite DDL is transactional), which also keeps two
// processes from migrating at once.
pub(super) const MIGRATIONS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS outbox_schema_migrations ( \
  version INTEGER PRIMARY KEY, description TEXT NOT NULL, checksum BLOB NOT NULL, \
  installed_on INTEGER NOT NULL)";
pub(super) const MIGRATIONS_APPLIED: &str = "SELECT version, checksum FROM outbox_schema_migrations";
pub(super) const MIGRATIONS_RECORD: &str = concat!(
    "INSERT INTO outbox_schema_migrations (version, description, checksum, installed_on) VALUES (?1, ?2, ?3, ",
    now!(),
    ")"
);

/// Starts a write transaction at once (instead of at the first write), waiting for the busy timeout.
pub(super) const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";
/// Write transactions start with [`BEGIN_IMMEDIATE`].
pub(super) const BEGIN_WRITE: Option<&str> = Some(BEGIN_IMMEDIATE);

/// `n` copies of `item`, comma-separated.
fn repeat(item: &str, n: usize) -> String {
    vec![item; n].join(", ")
}
