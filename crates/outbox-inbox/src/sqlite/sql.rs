//! Every SQL statement of the SQLite inbox, in one place. Tables: `migrations/sqlite/0002_inbox.sql`.
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

// Binds (consumer, key, seq). A row (prev_seq, seq) with seq = the message's: new for its key
// (prev_seq: the highest before, NULL for a new key); gap_from is lowered when it skipped seqs, and
// the gap itself is recorded by RECORD_GAP. A row with a higher seq: below the highest, but the key
// has open gaps from gap_from on: run FILL_GAP. No row: a duplicate, nothing written.
pub(super) const RECORD_KEYED: &str = concat!(
    "INSERT INTO outbox_inbox_keys AS k (consumer, key, seq, gap_from, updated_at) \
     VALUES (?1, ?2, ?3, CASE WHEN ?3 > 1 THEN 1 END, ",
    now!(),
    ") ON CONFLICT (consumer, key) DO UPDATE SET \
       seq = max(k.seq, excluded.seq), \
       prev_seq = CASE WHEN k.seq < excluded.seq THEN k.seq ELSE k.prev_seq END, \
       gap_from = CASE WHEN k.seq + 1 < excluded.seq THEN coalesce(k.gap_from, k.seq + 1) ELSE k.gap_from END, \
       updated_at = CASE WHEN k.seq < excluded.seq THEN excluded.updated_at ELSE k.updated_at END \
     WHERE k.seq < excluded.seq OR (k.gap_from <= excluded.seq AND excluded.seq < k.seq) \
     RETURNING prev_seq, seq"
);

// Binds (consumer, key, from_seq, to_seq): the gap a new message just skipped. It cannot collide
// with an open gap; ON CONFLICT only keeps leftovers of tables emptied by hand from failing it.
pub(super) const RECORD_GAP: Option<&str> = Some(concat!(
    "INSERT INTO outbox_inbox_gaps (consumer, key, from_seq, to_seq, created_at) VALUES (?1, ?2, ?3, ?4, ",
    now!(),
    ") ON CONFLICT (consumer, key, from_seq) DO UPDATE SET to_seq = excluded.to_seq, \
     created_at = excluded.created_at"
));

// Run in order, each bound with (consumer, key, seq), after RECORD_KEYED said "below the highest,
// the key has open gaps". The first answers the gap holding seq as it was (no row: a duplicate);
// the others cut seq out of it: insert the part above seq, shrink the row to the part below, or
// delete it when it started at seq; then set gap_from to the lowest remaining gap (NULL: none).
pub(super) const FILL_GAP: &[&str] = &[
    "SELECT from_seq, to_seq FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND key = ?2 AND from_seq <= ?3 AND to_seq >= ?3",
    "INSERT INTO outbox_inbox_gaps (consumer, key, from_seq, to_seq, created_at) \
     SELECT consumer, key, ?3 + 1, to_seq, created_at FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND key = ?2 AND from_seq <= ?3 AND to_seq > ?3",
    "UPDATE outbox_inbox_gaps SET to_seq = ?3 - 1 \
     WHERE consumer = ?1 AND key = ?2 AND from_seq < ?3 AND to_seq >= ?3",
    "DELETE FROM outbox_inbox_gaps WHERE consumer = ?1 AND key = ?2 AND from_seq = ?3",
    "UPDATE outbox_inbox_keys SET gap_from = (SELECT min(from_seq) FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND key = ?2) WHERE consumer = ?1 AND key = ?2",
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

// The same for gaps recorded longer ago than the window. The keys' gap_from is left as is: too low
// is harmless (FILL_GAP finds nothing and repairs it).
pub(super) const DELETE_EXPIRED_GAPS: &str = concat!(
    "DELETE FROM outbox_inbox_gaps WHERE rowid IN (SELECT rowid FROM outbox_inbox_gaps \
     WHERE consumer = ?1 AND created_at < ",
    now!(),
    " - ?2 * 1000 LIMIT ?3)"
);
