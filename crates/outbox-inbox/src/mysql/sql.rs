//! Every SQL statement of the MySQL/MariaDB inbox, in one place. Tables: `migrations/mysql/0002_inbox.sql`
//! and `0003_outbox_source.sql`.
//!
//! Written for MySQL 8.0.13+ and MariaDB 10.6+ alike: no `RETURNING`, no writable CTEs, `?`
//! placeholders, each bound once and in the order the shared code binds them (consumer, source,
//! key, seq): a statement that needs a value twice, or in another order, takes the binds as a
//! one-row derived table `p`. Keys are found by their SHA-256 (`key_hash`), as in `outbox_keys`.
//! "Now" is `UTC_TIMESTAMP(6)`.
//!
//! Locking (InnoDB, REPEATABLE READ or READ COMMITTED): the record statement takes the key row's
//! lock (`INSERT ... ON DUPLICATE KEY UPDATE` locks the existing row even when it changes nothing,
//! and reads its latest committed version, whatever the transaction's snapshot), so deliveries of one
//! key are serialized as on PostgreSQL, and a waiting one sees what the first one committed. The
//! common path locks that one row and nothing else. Only a seq below the key's highest and at or
//! above its `gap_from` (a late message, or a duplicate of a key with open gaps) reads the key's gap
//! rows, with `FOR UPDATE`: under REPEATABLE READ InnoDB also locks the index gap after them, which
//! can make a new gap of a neighbouring key (in `key_hash` order) wait for this transaction. A
//! deadlock there is reported as such (1213), and the inbox calls it retryable.

/// What `RECORD_KEYED` and `RECORD_UNKEYED` leave as the OK packet's insert id when no row advanced:
/// nothing passed to `LAST_INSERT_ID(expr)`, so 0: a new row was inserted.
pub(super) const ANSWER_INSERTED: u64 = 0;
/// `LAST_INSERT_ID(1)`: a duplicate, nothing written (literal `1` in the statements).
pub(super) const ANSWER_DUPLICATE: u64 = 1;
/// `LAST_INSERT_ID(2)`: below the highest, in the key's range of open gaps: run FILL_GAP (literal `2`).
pub(super) const ANSWER_BELOW_TOP: u64 = 2;

// One round trip for a keyed message; binds (consumer, source, key, seq). The message is new when the key is
// new (the row is inserted with gap_from = 1 when it starts above seq 1) or when seq is above the
// highest (the row advances: prev_seq = the old highest, gap_from lowered if it skipped seqs). The
// caller tells them apart by the OK packet: an inserted row counts 1 row affected and passes nothing
// to LAST_INSERT_ID (insert id 0); an advanced (changed) row counts 2, and LAST_INSERT_ID(seq) passes
// the old highest. Otherwise nothing changes and LAST_INSERT_ID passes 2 (below the highest, at or
// above gap_from: the key has open gaps that may hold seq, run FILL_GAP) or 1 (a duplicate).
//
// In the VALUES list `key` and seq are the values just given (a column set earlier in the list).
// The assignments of ON DUPLICATE KEY UPDATE run left to right, each seeing the ones before: the
// answer and prev_seq are computed first, from the row as it was, and seq last.
pub(super) const RECORD_KEYED: &str = "\
INSERT INTO outbox_inbox_keys (consumer, `source`, `key`, key_hash, seq, gap_from, updated_at) \
VALUES (?, ?, ?, UNHEX(SHA2(`key`, 256)), ?, IF(seq > 1, 1, NULL), UTC_TIMESTAMP(6)) \
ON DUPLICATE KEY UPDATE \
  prev_seq = IF(seq < VALUES(seq), LAST_INSERT_ID(seq), \
                IF(LAST_INSERT_ID(IF(gap_from <= VALUES(seq) AND VALUES(seq) < seq, 2, 1)), prev_seq, prev_seq)), \
  gap_from = IF(seq + 1 < VALUES(seq), COALESCE(gap_from, seq + 1), gap_from), \
  updated_at = IF(seq < VALUES(seq), VALUES(updated_at), updated_at), \
  seq = GREATEST(seq, VALUES(seq))";

// Binds (consumer, source, key, from_seq, to_seq): the gap a new message just skipped, written under
// the key row's lock. It cannot collide with an open gap (it starts above the old highest, open ones are
// below it); ON DUPLICATE KEY UPDATE only keeps leftovers of tables emptied by hand from failing it.
pub(super) const RECORD_GAP: Option<&str> = Some(
    "\
INSERT INTO outbox_inbox_gaps (consumer, `source`, key_hash, from_seq, to_seq, created_at) \
VALUES (?, ?, UNHEX(SHA2(?, 256)), ?, ?, UTC_TIMESTAMP(6)) \
ON DUPLICATE KEY UPDATE to_seq = VALUES(to_seq), created_at = VALUES(created_at)",
);

// Run in order, each bound with (consumer, source, key, seq), after RECORD_KEYED answered "below the highest,
// the key has open gaps", so with the key row locked by this transaction: every gap of the key was
// written under that lock. The first answers the gap holding seq as it was (no row: a duplicate) and
// locks it (FOR UPDATE reads the latest committed rows, whatever the snapshot). The others cut seq
// out of it: insert the part above seq (keeping created_at),
// shrink the row to the part below, or delete it when it started at seq; then set the key's gap_from
// to the lowest remaining gap (NULL: none left; this also repairs a gap_from left too low, when seq
// was in no gap). The gap rows are reached by the key's (consumer, source, key_hash) prefix of the
// primary key (the derived table `p` is a constant row), so the locks stay on the key's own rows and
// the index gap right after them.
pub(super) const FILL_GAP: &[&str] = &[
    "\
SELECT g.from_seq, g.to_seq \
FROM (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash, ? AS seq) AS p \
JOIN outbox_inbox_gaps g ON g.consumer = p.consumer AND g.`source` = p.`source` AND g.key_hash = p.key_hash \
WHERE g.from_seq <= p.seq AND p.seq <= g.to_seq \
FOR UPDATE",
    "\
INSERT INTO outbox_inbox_gaps (consumer, `source`, key_hash, from_seq, to_seq, created_at) \
SELECT g.consumer, g.`source`, g.key_hash, p.seq + 1, g.to_seq, g.created_at \
FROM (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash, ? AS seq) AS p \
JOIN outbox_inbox_gaps g ON g.consumer = p.consumer AND g.`source` = p.`source` AND g.key_hash = p.key_hash \
WHERE g.from_seq <= p.seq AND p.seq < g.to_seq",
    "\
UPDATE outbox_inbox_gaps g \
JOIN (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash, ? AS seq) AS p \
  ON g.consumer = p.consumer AND g.`source` = p.`source` AND g.key_hash = p.key_hash \
SET g.to_seq = p.seq - 1 \
WHERE g.from_seq < p.seq AND p.seq <= g.to_seq",
    "\
DELETE FROM outbox_inbox_gaps \
WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256)) AND from_seq = ?",
    "\
UPDATE outbox_inbox_keys k \
JOIN (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash, ? AS seq) AS p \
  ON k.consumer = p.consumer AND k.`source` = p.`source` AND k.key_hash = p.key_hash \
SET k.gap_from = (SELECT MIN(g.from_seq) FROM outbox_inbox_gaps g \
                  WHERE g.consumer = k.consumer AND g.`source` = k.`source` AND g.key_hash = k.key_hash)",
];

// Under GapPolicy::Hold, after RECORD_KEYED advanced the key past a gap (or created it above seq 1):
// each bound (consumer, source, key, previous). Puts the key back to seq = previous (0 for a key it
// created) with gap_from the lowest open gap (RECORD_GAP has not run). The row stays locked.
pub(super) const UNDO_ADVANCE: &[&str] = &["\
UPDATE outbox_inbox_keys k \
JOIN (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash, ? AS prev) AS p \
  ON k.consumer = p.consumer AND k.`source` = p.`source` AND k.key_hash = p.key_hash \
SET k.seq = p.prev, \
    k.gap_from = (SELECT MIN(g.from_seq) FROM outbox_inbox_gaps g \
                  WHERE g.consumer = k.consumer AND g.`source` = k.`source` AND g.key_hash = k.key_hash)"];

/// What `PARK` leaves as the OK packet's insert id when the message was parked before:
/// `LAST_INSERT_ID(1)` (literal `1` in the statement); a new row passes nothing (0).
pub(super) const ANSWER_PARKED_BEFORE: u64 = 1;

// Binds (consumer, source, key, seq, id, topic, payload, headers), written under the key row's lock.
// A new row passes nothing to LAST_INSERT_ID (insert id 0); a message parked before changes nothing
// and passes 1 (rows affected cannot tell: CLIENT_FOUND_ROWS counts the unchanged row).
pub(super) const PARK: &str = "\
INSERT INTO outbox_inbox_parked \
  (consumer, `source`, `key`, key_hash, seq, message_id, topic, payload, headers, parked_at) \
VALUES (?, ?, ?, UNHEX(SHA2(`key`, 256)), ?, ?, ?, ?, ?, UTC_TIMESTAMP(6)) \
ON DUPLICATE KEY UPDATE seq = IF(LAST_INSERT_ID(1), seq, seq)";

// Each bound (consumer, source, key, seq), on the transaction that holds the key row: the first
// reads the parked message seq and locks it (FOR UPDATE reads the latest committed rows, so every
// message parked under the key row's lock is seen), the second deletes it.
pub(super) const TAKE_PARKED: &[&str] = &[
    "\
SELECT message_id, topic, payload, headers FROM outbox_inbox_parked \
WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256)) AND seq = ? \
FOR UPDATE",
    "\
DELETE FROM outbox_inbox_parked \
WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256)) AND seq = ?",
];

// A failed statement is rolled back alone (a deadlock rolls back the whole transaction, and the
// COMMIT that follows then fails): the transaction stays usable.
pub(super) const CHECK_USABLE: Option<&str> = None;
pub(super) const COMMIT_CHECKED: Option<&str> = None;

// Binds (consumer, source, key, seq).
pub(super) const DROP_PARKED_UPTO: &str = "\
DELETE FROM outbox_inbox_parked \
WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256)) AND seq <= ?";

// Binds (consumer, source, key): the lowest parked seq of the key (NULL: none), read on the
// transaction that holds the key row (a locking read: the latest committed rows).
pub(super) const LOWEST_PARKED: &str = "\
SELECT MIN(seq) FROM outbox_inbox_parked \
WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256)) \
FOR UPDATE";

pub(super) const KEY_SEQ: &str = "\
SELECT seq FROM outbox_inbox_keys WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256))";

// Binds (consumer, key): a row when the key has records of the default source. A plain read: the
// statements of ADOPT lock what they move.
pub(super) const LEGACY_KEY: Option<&str> = Some(
    "\
SELECT seq FROM outbox_inbox_keys WHERE consumer = ? AND `source` = '' AND key_hash = UNHEX(SHA2(?, 256))",
);

// Each bound (consumer, source, key), in order: drop what RECORD_KEYED just created for the source's
// first message of the key, then move the default source's records of the key to the source (an
// UPDATE reads the latest committed row and locks it).
pub(super) const ADOPT: &[&str] = &[
    "DELETE FROM outbox_inbox_gaps WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256))",
    "DELETE FROM outbox_inbox_keys WHERE consumer = ? AND `source` = ? AND key_hash = UNHEX(SHA2(?, 256))",
    "\
UPDATE outbox_inbox_keys t \
JOIN (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash) AS p \
  ON t.consumer = p.consumer AND t.`source` = '' AND t.key_hash = p.key_hash \
SET t.`source` = p.`source`",
    "\
UPDATE outbox_inbox_gaps t \
JOIN (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash) AS p \
  ON t.consumer = p.consumer AND t.`source` = '' AND t.key_hash = p.key_hash \
SET t.`source` = p.`source`",
    "\
UPDATE outbox_inbox_parked t \
JOIN (SELECT ? AS consumer, ? AS `source`, UNHEX(SHA2(?, 256)) AS key_hash) AS p \
  ON t.consumer = p.consumer AND t.`source` = '' AND t.key_hash = p.key_hash \
SET t.`source` = p.`source`",
];

// One round trip for an unkeyed message; binds (consumer, id). A new id inserts its row and passes
// nothing to LAST_INSERT_ID (insert id 0); a duplicate changes nothing and passes 1. A concurrent
// insert of the same id makes this wait on the primary key until that transaction ends, then it sees
// the committed row (or inserts, if that one rolled back). Not INSERT IGNORE: that would also turn
// errors such as an over-long consumer name into warnings (and truncation).
pub(super) const RECORD_UNKEYED: &str = "\
INSERT INTO outbox_inbox_messages (consumer, message_id, processed_at) VALUES (?, ?, UTC_TIMESTAMP(6)) \
ON DUPLICATE KEY UPDATE processed_at = IF(LAST_INSERT_ID(1), processed_at, processed_at)";

// One batch of the cleanup: one statement, so one short transaction of its own (autocommit). Binds
// (consumer, retention ms, batch). The expired rows are found in processed_at order on the
// (consumer, processed_at) index. MySQL has no SKIP LOCKED for DELETE: a concurrent cleanup waits
// for this batch instead of skipping it.
pub(super) const DELETE_EXPIRED: &str = "\
DELETE FROM outbox_inbox_messages \
WHERE consumer = ? AND processed_at < TIMESTAMPADD(MICROSECOND, ? * -1000, UTC_TIMESTAMP(6)) \
ORDER BY processed_at LIMIT ?";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answers_are_the_ones_the_statements_pass() {
        assert_eq!((ANSWER_INSERTED, ANSWER_DUPLICATE, ANSWER_BELOW_TOP), (0, 1, 2));
        assert!(RECORD_KEYED.contains("LAST_INSERT_ID(IF(gap_from <= VALUES(seq) AND VALUES(seq) < seq, 2, 1))"));
        assert!(RECORD_UNKEYED.contains("LAST_INSERT_ID(1)"));
        assert_eq!(ANSWER_PARKED_BEFORE, 1);
        assert!(PARK.contains("LAST_INSERT_ID(1)"));
    }
}
