//! Every SQL statement of the SQLite inbox, in one place. Tables: `migrations/sqlite/0002_inbox.sql`.
//! SQLite has one writer at a time, so the record statement cannot race a concurrent delivery: the
//! second writer waits (busy timeout) and then sees the first one's row.

/// The database clock in microseconds since the Unix epoch (same as the outbox tables).
macro_rules! now {
    () => {
        "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)"
    };
}

// A row back = new for its key (prev_seq: the highest before, NULL for a new key); none = duplicate.
pub(super) const RECORD_KEYED: &str = concat!(
    "INSERT INTO outbox_inbox_keys AS k (consumer, key, seq, updated_at) VALUES (?1, ?2, ?3, ",
    now!(),
    ") ON CONFLICT (consumer, key) DO UPDATE SET seq = excluded.seq, prev_seq = k.seq, \
     updated_at = excluded.updated_at WHERE k.seq < excluded.seq RETURNING prev_seq"
);

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
