//! Every SQL statement of the PostgreSQL inbox, in one place. Tables are created by
//! `migrations/postgres/0002_inbox.sql` and `0003_outbox_source.sql`.

// One round trip for a keyed message; binds (consumer, source, key, seq). A row (prev_seq, seq) comes
// back when the message is new for its key (insert, or seq above the highest): seq is then the
// message's own and prev_seq the highest before it (NULL for a new key). If it skipped seqs, the gap
// prev_seq+1..=seq-1 (1..=seq-1 for a new key) is recorded in outbox_inbox_gaps by the same
// statement and gap_from lowered to cover it. A row whose seq is above the message's means "below
// the highest, but the key has open gaps from gap_from on": run FILL_GAP. No row means a duplicate
// (at or below the highest, below any open gap), and nothing was written. The row's third column
// says, for a new key of a source (not the default ''), whether the key has records of the default
// source (to adopt, see ADOPT): asked here, it costs no round trip of its own.
//
// ON CONFLICT DO UPDATE locks the key row even when its WHERE is false, and evaluates the WHERE on
// the latest committed version, so a concurrent delivery of the same key waits for this transaction
// and then sees its result (gap_from included). The gap insert cannot collide with an open gap (a new
// gap starts above the old highest, open ones are below it); ON CONFLICT only keeps leftovers of
// tables emptied by hand from failing the message.
pub(super) const RECORD_KEYED: &str = "\
WITH k AS ( \
  INSERT INTO outbox_inbox_keys AS k (consumer, source, key, seq, gap_from) \
  VALUES ($1, $2, $3, $4, CASE WHEN $4 > 1 THEN 1 END) \
  ON CONFLICT (consumer, source, key) DO UPDATE SET \
    seq = GREATEST(k.seq, EXCLUDED.seq), \
    prev_seq = CASE WHEN k.seq < EXCLUDED.seq THEN k.seq ELSE k.prev_seq END, \
    gap_from = CASE WHEN k.seq + 1 < EXCLUDED.seq THEN COALESCE(k.gap_from, k.seq + 1) ELSE k.gap_from END, \
    updated_at = CASE WHEN k.seq < EXCLUDED.seq THEN now() ELSE k.updated_at END \
  WHERE k.seq < EXCLUDED.seq OR (k.gap_from <= EXCLUDED.seq AND EXCLUDED.seq < k.seq) \
  RETURNING prev_seq, seq \
), gap AS ( \
  INSERT INTO outbox_inbox_gaps (consumer, source, key, from_seq, to_seq) \
  SELECT $1, $2, $3, COALESCE(prev_seq, 0) + 1, $4 - 1 FROM k \
  WHERE seq = $4 AND COALESCE(prev_seq, 0) + 1 < $4 \
  ON CONFLICT (consumer, source, key, from_seq) DO UPDATE SET to_seq = EXCLUDED.to_seq, created_at = now() \
) \
SELECT prev_seq, seq, CASE WHEN prev_seq IS NULL AND seq = $4 AND $2 <> '' THEN EXISTS ( \
  SELECT 1 FROM outbox_inbox_keys l WHERE l.consumer = $1 AND l.source = '' AND l.key = $3) ELSE false END \
FROM k";

// RECORD_KEYED records the gap itself.
pub(super) const RECORD_GAP: Option<&str> = None;

// Run only after RECORD_KEYED answered "below the highest, the key has open gaps", so with the key
// row locked by this transaction: every gap of the key was written under that lock, and this new
// statement's snapshot (READ COMMITTED) sees them all. Binds (consumer, source, key, seq). Deletes
// the gap holding seq and re-inserts what is left of it (below and above seq, keeping created_at),
// then sets the key's gap_from to the lowest remaining gap (NULL: none left; also repairs a gap_from
// left too low). Returns the gap's (from_seq, to_seq) as it was; no row: seq is in no gap, a
// duplicate.
pub(super) const FILL_GAP: &[&str] = &["\
WITH hit AS ( \
  DELETE FROM outbox_inbox_gaps \
  WHERE consumer = $1 AND source = $2 AND key = $3 AND from_seq <= $4 AND to_seq >= $4 \
  RETURNING from_seq, to_seq, created_at \
), piece AS ( \
  INSERT INTO outbox_inbox_gaps (consumer, source, key, from_seq, to_seq, created_at) \
  SELECT $1, $2, $3, p.from_seq, p.to_seq, hit.created_at \
  FROM hit CROSS JOIN LATERAL (VALUES (hit.from_seq, $4 - 1), ($4 + 1, hit.to_seq)) AS p (from_seq, to_seq) \
  WHERE p.from_seq <= p.to_seq \
  RETURNING from_seq \
), floor AS ( \
  UPDATE outbox_inbox_keys SET gap_from = ( \
    SELECT min(r.f) FROM ( \
      SELECT g.from_seq FROM outbox_inbox_gaps g \
      WHERE g.consumer = $1 AND g.source = $2 AND g.key = $3 AND NOT (g.from_seq <= $4 AND g.to_seq >= $4) \
      UNION ALL SELECT from_seq FROM piece) AS r (f)) \
  WHERE consumer = $1 AND source = $2 AND key = $3 \
) \
SELECT from_seq, to_seq FROM hit"];

// Under GapPolicy::Hold, after RECORD_KEYED advanced the key past a gap (or created it above seq
// 1): binds (consumer, source, key, previous). Deletes the gap RECORD_KEYED recorded (it starts at
// previous + 1; open gaps are all below previous) and puts the key back to seq = previous (0 for a
// key it created: nothing applied yet) with gap_from the lowest open gap left. The row stays locked
// by this transaction.
pub(super) const UNDO_ADVANCE: &[&str] = &["\
WITH g AS ( \
  DELETE FROM outbox_inbox_gaps WHERE consumer = $1 AND source = $2 AND key = $3 AND from_seq = $4 + 1 \
) \
UPDATE outbox_inbox_keys SET seq = $4, gap_from = ( \
  SELECT min(from_seq) FROM outbox_inbox_gaps \
  WHERE consumer = $1 AND source = $2 AND key = $3 AND from_seq <> $4 + 1) \
WHERE consumer = $1 AND source = $2 AND key = $3"];

// Binds (consumer, source, key, seq, id, topic, payload, headers): one row inserted = parked, none =
// parked before (a duplicate delivery). Written under the key row's lock, like the gaps.
pub(super) const PARK: &str = "\
INSERT INTO outbox_inbox_parked (consumer, source, key, seq, message_id, topic, payload, headers) \
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
ON CONFLICT (consumer, source, key, seq) DO NOTHING";

// Binds (consumer, source, key, seq): takes the parked message seq (deleted, returned), on the
// transaction that holds the key row, so every message parked under that lock is seen.
pub(super) const TAKE_PARKED: &[&str] = &["\
DELETE FROM outbox_inbox_parked WHERE consumer = $1 AND source = $2 AND key = $3 AND seq = $4 \
RETURNING message_id, topic, payload, headers"];

// Fails (25P02) on a transaction a failed statement aborted: its COMMIT would roll back.
macro_rules! check_usable {
    () => {
        "SELECT 1"
    };
}
pub(super) const CHECK_USABLE: Option<&str> = Some(check_usable!());
// The same check in the commit's round trip: after an error the rest is not run.
pub(super) const COMMIT_CHECKED: Option<&str> = Some(concat!(check_usable!(), "; COMMIT; BEGIN"));

// Binds (consumer, source, key, seq).
pub(super) const DROP_PARKED_UPTO: &str =
    "DELETE FROM outbox_inbox_parked WHERE consumer = $1 AND source = $2 AND key = $3 AND seq <= $4";

// Binds (consumer, source, key): the lowest parked seq of the key (NULL: none).
pub(super) const LOWEST_PARKED: &str = "\
SELECT min(seq) FROM outbox_inbox_parked WHERE consumer = $1 AND source = $2 AND key = $3";

pub(super) const KEY_SEQ: &str = "\
SELECT seq FROM outbox_inbox_keys WHERE consumer = $1 AND source = $2 AND key = $3";

// RECORD_KEYED answers whether a new key has records of the default source ('': written before
// messages carried their source, or sent by a relay that does not send it).
pub(super) const LEGACY_KEY: Option<&str> = None;

// Each bound (consumer, source, key), in order: drop what RECORD_KEYED just created for the source's
// first message of the key, then move the default source's records of the key to the source. The
// UPDATEs lock the rows they move (and wait for a concurrent delivery holding them); one that was
// moved meanwhile is not found again, and the message is then recorded as its source's first.
pub(super) const ADOPT: &[&str] = &[
    "DELETE FROM outbox_inbox_gaps WHERE consumer = $1 AND source = $2 AND key = $3",
    "DELETE FROM outbox_inbox_keys WHERE consumer = $1 AND source = $2 AND key = $3",
    "UPDATE outbox_inbox_keys SET source = $2 WHERE consumer = $1 AND source = '' AND key = $3",
    "UPDATE outbox_inbox_gaps SET source = $2 WHERE consumer = $1 AND source = '' AND key = $3",
    "UPDATE outbox_inbox_parked SET source = $2 WHERE consumer = $1 AND source = '' AND key = $3",
];

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
