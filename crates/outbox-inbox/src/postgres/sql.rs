//! Every SQL statement of the PostgreSQL inbox, in one place. Tables are created by
//! `migrations/postgres/0002_inbox.sql`.

// One round trip for a keyed message; binds (consumer, key, seq). A row (prev_seq, seq) comes back
// when the message is new for its key (insert, or seq above the highest): seq is then the message's
// own and prev_seq the highest before it (NULL for a new key). If it skipped seqs, the gap
// prev_seq+1..=seq-1 (1..=seq-1 for a new key) is recorded in outbox_inbox_gaps by the same
// statement and gap_from lowered to cover it. A row whose seq is above the message's means "below
// the highest, but the key has open gaps from gap_from on": run FILL_GAP. No row means a duplicate
// (at or below the highest, below any open gap), and nothing was written.
//
// ON CONFLICT DO UPDATE locks the key row even when its WHERE is false, and evaluates the WHERE on
// the latest committed version, so a concurrent delivery of the same key waits for this transaction
// and then sees its result (gap_from included). The gap insert cannot collide with an open gap (a new
// gap starts above the old highest, open ones are below it); ON CONFLICT only keeps leftovers of
// tables emptied by hand from failing the message.
pub(super) const RECORD_KEYED: &str = "\
WITH k AS ( \
  INSERT INTO outbox_inbox_keys AS k (consumer, key, seq, gap_from) \
  VALUES ($1, $2, $3, CASE WHEN $3 > 1 THEN 1 END) \
  ON CONFLICT (consumer, key) DO UPDATE SET \
    seq = GREATEST(k.seq, EXCLUDED.seq), \
    prev_seq = CASE WHEN k.seq < EXCLUDED.seq THEN k.seq ELSE k.prev_seq END, \
    gap_from = CASE WHEN k.seq + 1 < EXCLUDED.seq THEN COALESCE(k.gap_from, k.seq + 1) ELSE k.gap_from END, \
    updated_at = CASE WHEN k.seq < EXCLUDED.seq THEN now() ELSE k.updated_at END \
  WHERE k.seq < EXCLUDED.seq OR (k.gap_from <= EXCLUDED.seq AND EXCLUDED.seq < k.seq) \
  RETURNING prev_seq, seq \
), gap AS ( \
  INSERT INTO outbox_inbox_gaps (consumer, key, from_seq, to_seq) \
  SELECT $1, $2, COALESCE(prev_seq, 0) + 1, $3 - 1 FROM k \
  WHERE seq = $3 AND COALESCE(prev_seq, 0) + 1 < $3 \
  ON CONFLICT (consumer, key, from_seq) DO UPDATE SET to_seq = EXCLUDED.to_seq, created_at = now() \
) \
SELECT prev_seq, seq FROM k";

// RECORD_KEYED records the gap itself.
pub(super) const RECORD_GAP: Option<&str> = None;

// Run only after RECORD_KEYED answered "below the highest, the key has open gaps", so with the key
// row locked by this transaction: every gap of the key was written under that lock, and this new
// statement's snapshot (READ COMMITTED) sees them all. Binds (consumer, key, seq). Deletes the gap
// holding seq and re-inserts what is left of it (below and above seq, keeping created_at), then
// sets the key's gap_from to the lowest remaining gap (NULL: none left; also repairs a gap_from
// left behind by the cleanup). Returns the gap's (from_seq, to_seq) as it was; no row: seq is in no
// gap, a duplicate. The DELETE locks the gap row, so the cleanup cannot take it meanwhile.
pub(super) const FILL_GAP: &[&str] = &["\
WITH hit AS ( \
  DELETE FROM outbox_inbox_gaps WHERE consumer = $1 AND key = $2 AND from_seq <= $3 AND to_seq >= $3 \
  RETURNING from_seq, to_seq, created_at \
), piece AS ( \
  INSERT INTO outbox_inbox_gaps (consumer, key, from_seq, to_seq, created_at) \
  SELECT $1, $2, p.from_seq, p.to_seq, hit.created_at \
  FROM hit CROSS JOIN LATERAL (VALUES (hit.from_seq, $3 - 1), ($3 + 1, hit.to_seq)) AS p (from_seq, to_seq) \
  WHERE p.from_seq <= p.to_seq \
  RETURNING from_seq \
), floor AS ( \
  UPDATE outbox_inbox_keys SET gap_from = ( \
    SELECT min(r.f) FROM ( \
      SELECT g.from_seq FROM outbox_inbox_gaps g \
      WHERE g.consumer = $1 AND g.key = $2 AND NOT (g.from_seq <= $3 AND g.to_seq >= $3) \
      UNION ALL SELECT from_seq FROM piece) AS r (f)) \
  WHERE consumer = $1 AND key = $2 \
) \
SELECT from_seq, to_seq FROM hit"];

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

// The same for gaps recorded longer ago than the window, on the (consumer, created_at) index. SKIP
// LOCKED also passes over a gap that a delivery is filling right now. The keys' gap_from is left
// as is: too low is harmless (FILL_GAP finds nothing and repairs it).
pub(super) const DELETE_EXPIRED_GAPS: &str = "\
DELETE FROM outbox_inbox_gaps WHERE ctid = ANY(ARRAY( \
  SELECT ctid FROM outbox_inbox_gaps \
  WHERE consumer = $1 AND created_at < now() - $2::bigint * interval '1 millisecond' \
  LIMIT $3 FOR UPDATE SKIP LOCKED))";
