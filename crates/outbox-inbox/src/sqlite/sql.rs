//! Every SQL statement of the SQLite inbox, in one place. Tables: `migrations/sqlite/0002_inbox.sql`
//! and `0003_outbox_source.sql`.
//! SQLite has one writer at a time, so the record statement cannot race a concurrent delivery: the
//! second writer waits (busy timeout) and then sees the first one's row. A transaction's first
//! statement is the (write) record statement, so the follow-up statements below run under the
//! write lock and see everything committed before.

/// The database clock in microseconds since the Unix epoch (same as the outbox tables).
macro_rules! now {
    () => {
        "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)"
    };
}

// Binds (consumer, source, key, seq). A row (prev_seq, seq) with seq = the message's: new for its
// key (prev_seq: the highest before, NULL for a new key); gap_from is lowered when it skipped seqs,
// and the gap itself is recorded by RECORD_GAP. A row with a higher seq: below the highest, but the
// key has open gaps from gap_from on: run FILL_GAP. No row: a duplicate, nothing written. The third
// column: for a new key of a source (not the default ''), whether the key has records of the
// default source (see ADOPT).
pub(super) const RECORD_KEYED: &str = concat!(
    "INSERT INTO outbox_inbox_keys AS k (consumer, source, key, seq, gap_from, updated_at) \
     VALUES (?1, ?2, ?3, ?4, CASE WHEN ?4 > 1 THEN 1 END, ",
    now!(),
    ") ON CONFLICT (consumer, source, key) DO UPDATE SET \
       seq = max(k.seq, excluded.seq), \
       prev_seq = CASE WHEN k.seq < excluded.seq THEN k.seq ELSE k.prev_seq END, \
       gap_from = CASE WHEN k.seq + 1 < excluded.seq THEN coalesce(k.gap_from, k.seq + 1) ELSE k.gap_from END, \
       updated_at = CASE WHEN k.seq < excluded.seq THEN excluded.updated_at ELSE k.updated_at END \
     WHERE k.seq < excluded.seq OR (k.gap_from <= excluded.seq AND excluded.seq < k.seq) \
     RETURNING prev_seq, seq, CASE WHEN prev_seq IS NULL AND seq = ?4 AND ?2 <> '' THEN EXISTS ( \
       SELECT 1 FROM outbox_inbox_keys l WHERE l.consumer = ?1 AND l.source = '' AND l.key = ?3) ELSE 0 END"
);

// Binds (consumer, source, key, from_seq, to_seq): the gap a new message just skipped. It cannot
// collide with an open gap; ON CONFLICT only keeps leftovers of tables emptied by hand from failing
// it.
pub(super) const RECORD_GAP: Option<&str> = Some(concat!(
    "INSERT INTO outbox_inbox_gaps (consumer, source, key, from_seq, to_seq, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ",
    now!(),
    ") ON CONFLICT (consumer, source, key, from_seq) DO UPDATE SET to_seq = excluded.to_seq, \
     created_at = excluded.created_at"
));

// Run in order, each bound with (consumer, source, key, seq), after RECORD_KEYED said "below the
// highest, the key has open gaps". The first answers the gap holding seq as it was (no row: a
// duplicate); the others cut seq out of it: insert the part above seq, shrink the row to the part
// below, or delete it when it started at seq; then set gap_from to the lowest remaining gap (NULL:
// none).
pub(super) const FILL_GAP: &[&str] = &[
    "SELECT from_seq, to_seq FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND source = ?2 AND key = ?3 AND from_seq <= ?4 AND to_seq >= ?4",
    "INSERT INTO outbox_inbox_gaps (consumer, source, key, from_seq, to_seq, created_at) \
     SELECT consumer, source, key, ?4 + 1, to_seq, created_at FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND source = ?2 AND key = ?3 AND from_seq <= ?4 AND to_seq > ?4",
    "UPDATE outbox_inbox_gaps SET to_seq = ?4 - 1 \
     WHERE consumer = ?1 AND source = ?2 AND key = ?3 AND from_seq < ?4 AND to_seq >= ?4",
    "DELETE FROM outbox_inbox_gaps WHERE consumer = ?1 AND source = ?2 AND key = ?3 AND from_seq = ?4",
    "UPDATE outbox_inbox_keys SET gap_from = (SELECT min(from_seq) FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND source = ?2 AND key = ?3) WHERE consumer = ?1 AND source = ?2 AND key = ?3",
];

// Under GapPolicy::Hold, after RECORD_KEYED advanced the key past a gap (or created it above seq 1):
// each bound (consumer, source, key, previous). Puts the key back to seq = previous (0 for a key it
// created) with gap_from the lowest open gap (RECORD_GAP has not run).
pub(super) const UNDO_ADVANCE: &[&str] = &[
    "UPDATE outbox_inbox_keys SET seq = ?4, gap_from = (SELECT min(from_seq) FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND source = ?2 AND key = ?3) WHERE consumer = ?1 AND source = ?2 AND key = ?3",
];

// Binds (consumer, source, key, seq, id, topic, payload, headers): one row inserted = parked, none =
// parked before (a duplicate delivery).
pub(super) const PARK: &str = concat!(
    "INSERT INTO outbox_inbox_parked \
     (consumer, source, key, seq, message_id, topic, payload, headers, parked_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ",
    now!(),
    ") ON CONFLICT (consumer, source, key, seq) DO NOTHING"
);

// Binds (consumer, source, key, seq): takes the parked message seq (deleted, returned).
pub(super) const TAKE_PARKED: &[&str] = &["DELETE FROM outbox_inbox_parked \
     WHERE consumer = ?1 AND source = ?2 AND key = ?3 AND seq = ?4 \
     RETURNING message_id, topic, payload, headers"];

// A failed statement is rolled back alone: the transaction stays usable.
pub(super) const CHECK_USABLE: Option<&str> = None;
pub(super) const COMMIT_CHECKED: Option<&str> = None;

// Binds (consumer, source, key, seq).
pub(super) const DROP_PARKED_UPTO: &str =
    "DELETE FROM outbox_inbox_parked WHERE consumer = ?1 AND source = ?2 AND key = ?3 AND seq <= ?4";

// Binds (consumer, source, key): the lowest parked seq of the key (NULL: none).
pub(super) const LOWEST_PARKED: &str =
    "SELECT min(seq) FROM outbox_inbox_parked WHERE consumer = ?1 AND source = ?2 AND key = ?3";

pub(super) const KEY_SEQ: &str = "SELECT seq FROM outbox_inbox_keys WHERE consumer = ?1 AND source = ?2 AND key = ?3";

// RECORD_KEYED answers whether a new key has records of the default source.
pub(super) const LEGACY_KEY: Option<&str> = None;

// Each bound (consumer, source, key), in order: drop what RECORD_KEYED just created for the source's
// first message of the key, then move the default source's records of the key to the source.
pub(super) const ADOPT: &[&str] = &[
    "DELETE FROM outbox_inbox_gaps WHERE consumer = ?1 AND source = ?2 AND key = ?3",
    "DELETE FROM outbox_inbox_keys WHERE consumer = ?1 AND source = ?2 AND key = ?3",
    "UPDATE outbox_inbox_keys SET source = ?2 WHERE consumer = ?1 AND source = '' AND key = ?3",
    "UPDATE outbox_inbox_gaps SET source = ?2 WHERE consumer = ?1 AND source = '' AND key = ?3",
    "UPDATE outbox_inbox_parked SET source = ?2 WHERE consumer = ?1 AND source = '' AND key = ?3",
];

pub(super) const RECORD_UNKEYED: &str = concat!(
    "INSERT INTO outbox_inbox_messages (consumer, message_id, processed_at) VALUES (?1, ?2, ",
    now!(),
    ") ON CONFLICT (consumer, message_id) DO NOTHING"
);

// One batch of the cleanup: a short write transaction of its own.
pub(super) const DELETE_EXPIRED: &str = concat!(
    "DELETE FROM outbox_inbox_messages WHERE rowid IN (SELECT rowid FROM outbox_inbox_messages \
     WHERE consumer = ?1 AND processed_at < ",
    now!(),
    " - ?2 * 1000 LIMIT ?3)"
);
