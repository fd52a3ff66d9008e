//! Every SQL statement of the PostgreSQL inbox, in one place. Tables are created by
//! `migrations/postgres/0002_inbox.sql`.

// One round trip for a keyed message. A row comes back when the message is new for its key (insert,
// or seq above the highest): prev_seq is then the highest before it (NULL for a new key). No row
// means a duplicate. ON CONFLICT DO UPDATE locks the key row even when its WHERE is false, so a
// concurrent delivery of the same key waits for this transaction and then sees its result.
pub(super) const RECORD_KEYED: &str = "\
INSERT INTO outbox_inbox_keys AS k (consumer, key, seq) VALUES ($1, $2, $3) \
ON CONFLICT (consumer, key) DO UPDATE SET seq = EXCLUDED.seq, prev_seq = k.seq, updated_at = now() \
WHERE k.seq < EXCLUDED.seq \
RETURNING prev_seq";

// One round trip for an unkeyed message: one row inserted = new, none = duplicate. A concurrent
// insert of the same id makes this wait on the primary key until that transaction ends.
pub(super) const RECORD_UNKEYED: &str = "\
INSERT INTO outbox_inbox_messages (consumer, message_id) VALUES ($1, $2) \
ON CONFLICT (consumer, message_id) DO NOTHING";

// One batch of the cleanup, in its own transaction: the expired rows are found on the
// (consumer, processed_at) index and deleted by ctid. SKIP LOCKED: never wait on another cleanup.
pub(super) const DELETE_EXPIRED: &str = "\
DELETE FROM outbox_inbox_messages WHERE ctid = ANY(ARRAY( \
  SELECT ctid FROM outbox_inbox_messages \
  WHERE consumer = $1 AND processed_at < now() - $2::bigint * interval '1 millisecond' \
  LIMIT $3 FOR UPDATE SKIP LOCKED))";
