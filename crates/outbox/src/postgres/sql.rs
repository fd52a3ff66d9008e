//! Every SQL statement of the PostgreSQL backend and how its values decode, in one place: the
//! dialect the store body of [`crate::sql_store`] runs.
//!
//! Lease-guarded writes that decide a row's fate (a failure's backoff, a dead letter) lock the lease
//! row `FOR SHARE` in the same statement: a takeover (which updates that row) waits for them, and
//! they see a takeover that committed first. The marks of published rows only read it
//! (`MARK_LEASES`).

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The channel name, as a literal for `concat!`.
macro_rules! notify_channel {
    () => {
        "outbox_wake"
    };
}

/// The channel writers NOTIFY and the relay LISTENs on; the payload is the lane.
pub(super) const NOTIFY_CHANNEL: &str = notify_channel!();

/// Keys and owners come back as text.
pub(super) type Text = String;
/// Times come back as `timestamptz`.
pub(super) type Time = DateTime<Utc>;
/// The backlog's age, in seconds.
pub(super) type Age = f64;

pub(super) fn text(t: Text) -> Result<String, String> {
    Ok(t)
}

pub(super) fn lossy(t: Text) -> String {
    t
}

pub(super) fn time(t: Time) -> Result<DateTime<Utc>, String> {
    Ok(t)
}

pub(super) fn age(seconds: Age) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0))
}

/// Durations are bound as milliseconds.
pub(super) use crate::sql_store::millis as span;

/// Write transactions start with the pool's `BEGIN`.
pub(super) const BEGIN_WRITE: Option<&str> = None;

pub(super) const ENQUEUE_UNKEYED: &str = "\
INSERT INTO outbox_messages (lane, id, topic, payload, headers, available_at) \
SELECT $1, $2, $3, $4, $5, COALESCE($6, now() + $7::bigint * interval '1 millisecond')";

// NOTIFY only when the lane's relay is idle (see outbox_leases.idle) and holds the lane: a busy relay
// claims the row anyway, a relay gone without releasing its lanes (lease expired, flag left idle)
// hears nothing, and NOTIFY serializes committing transactions.
pub(super) const ENQUEUE_UNKEYED_NOTIFY: &str = concat!(
    "INSERT INTO outbox_messages (lane, id, topic, payload, headers, available_at) \
SELECT $1, $2, $3, $4, $5, COALESCE($6, now() + $7::bigint * interval '1 millisecond') \
FROM (SELECT 1) AS one LEFT JOIN LATERAL \
  (SELECT pg_notify('",
    notify_channel!(),
    "', $1::text) FROM outbox_leases WHERE lane = $1 AND idle AND expires_at > now()) AS w ON true"
);

// The counter row is locked before the message row gets its position, so per key, pos follows seq.
pub(super) const ENQUEUE_KEYED: &str = "\
WITH k AS (INSERT INTO outbox_keys AS c (key, seq) VALUES ($8, 1) \
           ON CONFLICT (key) DO UPDATE SET seq = c.seq + 1 RETURNING seq) \
INSERT INTO outbox_messages (lane, id, topic, payload, headers, available_at, key, seq) \
SELECT $1, $2, $3, $4, $5, COALESCE($6, now() + $7::bigint * interval '1 millisecond'), $8, k.seq FROM k \
RETURNING seq";

pub(super) const ENQUEUE_KEYED_NOTIFY: &str = concat!(
    "WITH k AS (INSERT INTO outbox_keys AS c (key, seq) VALUES ($8, 1) \
           ON CONFLICT (key) DO UPDATE SET seq = c.seq + 1 RETURNING seq) \
INSERT INTO outbox_messages (lane, id, topic, payload, headers, available_at, key, seq) \
SELECT $1, $2, $3, $4, $5, COALESCE($6, now() + $7::bigint * interval '1 millisecond'), $8, k.seq \
FROM k LEFT JOIN LATERAL \
  (SELECT pg_notify('",
    notify_channel!(),
    "', $1::text) FROM outbox_leases WHERE lane = $1 AND idle AND expires_at > now()) AS w ON true \
RETURNING seq"
);

// Many messages in one round trip. Counters are taken in key order (no deadlock between two
// batches), each key's block of seqs is handed out in input order. $9: send NOTIFY.
pub(super) const ENQUEUE_BATCH: &str = concat!(
    "WITH input AS ( \
  SELECT * FROM unnest($1::int[], $2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::timestamptz[], \
                       $7::bigint[], $8::text[]) \
  WITH ORDINALITY AS t(lane, id, topic, payload, headers, at, delay_ms, key, ord)), \
counts AS ( \
  INSERT INTO outbox_keys AS c (key, seq) \
  SELECT key, count(*) FROM input WHERE key IS NOT NULL GROUP BY key ORDER BY key \
  ON CONFLICT (key) DO UPDATE SET seq = c.seq + EXCLUDED.seq RETURNING key, seq), \
numbered AS ( \
  SELECT i.*, CASE WHEN i.key IS NULL THEN NULL ELSE \
    c.seq - count(*) OVER (PARTITION BY i.key) + row_number() OVER (PARTITION BY i.key ORDER BY i.ord) END AS seq \
  FROM input i LEFT JOIN counts c ON c.key = i.key), \
wake AS ( \
  SELECT count(*) AS n FROM (SELECT DISTINCT lane FROM input WHERE $9) l \
  JOIN outbox_leases o ON o.lane = l.lane AND o.idle AND o.expires_at > now(), \
  LATERAL (SELECT pg_notify('",
    notify_channel!(),
    "', l.lane::text)) AS x) \
INSERT INTO outbox_messages (lane, id, topic, payload, headers, available_at, key, seq) \
SELECT lane, id, topic, payload, headers, COALESCE(at, now() + delay_ms * interval '1 millisecond'), key, seq \
FROM numbered, wake ORDER BY ord \
RETURNING id, seq, lane"
);

pub(super) const ACQUIRE: &str = "\
UPDATE outbox_leases AS l SET owner = $1, epoch = l.epoch + 1, idle = false, \
       expires_at = now() + $3::bigint * interval '1 millisecond' \
WHERE l.lane IN (SELECT lane FROM outbox_leases WHERE owner IS NULL OR expires_at < now() \
                 ORDER BY lane LIMIT $2 FOR UPDATE SKIP LOCKED) \
RETURNING l.lane, l.epoch";

// Renewal doubles as the relay's heartbeat in outbox_relays (and forgets relays gone for a day).
// It locks its leases in lane order; a takeover skips locked rows, and the other writes that lock a
// lease row lock one.
pub(super) const RENEW: &str = "\
WITH hb AS (INSERT INTO outbox_relays (owner, expires_at) \
            VALUES ($1, now() + $2::bigint * interval '1 millisecond') \
            ON CONFLICT (owner) DO UPDATE SET expires_at = EXCLUDED.expires_at), \
gone AS (DELETE FROM outbox_relays WHERE expires_at < now() - interval '1 day') \
UPDATE outbox_leases SET expires_at = now() + $2::bigint * interval '1 millisecond' \
WHERE owner = $1 AND lane IN (SELECT lane FROM outbox_leases WHERE owner = $1 ORDER BY lane FOR UPDATE) \
RETURNING lane, epoch";

pub(super) const LEAVE: &str = "DELETE FROM outbox_relays WHERE owner = $1";

// A released lane's expires_at is when it was released: readiness counts a lane without an owner
// from then (a rebalance hands lanes over within a lease), not as unowned for ever.
pub(super) const RELEASE: &str = "\
UPDATE outbox_leases SET owner = NULL, expires_at = now(), idle = false \
WHERE lane = $1 AND owner = $2 AND epoch = $3";

pub(super) const SET_IDLE: &str = "\
UPDATE outbox_leases SET idle = $4 WHERE lane = $1 AND owner = $2 AND epoch = $3";

// Which of the lanes `lanes` (an int[]) have a row beyond their position in `after` (a bigint[])
// that is ready (never delayed nor failed, or due): one index probe per lane on (lane, pos). Rows
// held back behind their key's waiting or parked row count too; the claim that follows leaves them
// out.
fn ready_lanes(lanes: &str, after: &str) -> String {
    format!(
        "SELECT w.l FROM unnest({lanes}::int[], {after}::bigint[]) AS w(l, after) WHERE EXISTS ( \
  SELECT 1 FROM outbox_messages m WHERE m.lane = w.l AND m.pos > w.after \
    AND (m.available_at = m.created_at OR m.available_at <= now()))"
    )
}

/// The lingering lanes' look, lanes `$1` and positions `$2`.
pub(super) static READY_LANES: LazyLock<String> = LazyLock::new(|| ready_lanes("$1", "$2"));

/// The look with its values written into it, after [`LOCAL_SETTINGS`]: one query string in the
/// simple protocol, so one round trip, one implicit transaction that the settings end with (for
/// when the store's own connections are refused). Only integers go into the text.
pub(super) fn ready_lanes_with_settings(lanes: &[(i32, i64)]) -> String {
    let array = |items: Vec<String>| format!("'{{{}}}'", items.join(","));
    let l = array(lanes.iter().map(|(l, _)| l.to_string()).collect());
    let after = array(lanes.iter().map(|(_, a)| a.to_string()).collect());
    format!("{}; {}", *LOCAL_SETTINGS, ready_lanes(&l, &after))
}

// The transactions open now, and which of them still are: a lane whose flag just said idle looks
// once more when writers that may have read it as busy have ended (writers.rs in outbox-relay).
// The snapshot lists the open transactions below its xmax (the latest ended one's id + 1); those
// that took their ids since are the ones from there up to an id this statement takes (committed
// without waiting for the WAL flush, as the marks are). Top-level transactions only: a
// subtransaction's rows become visible with its parent's commit.
pub(super) const OPEN_TRANSACTIONS: &str = "\
SELECT ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(t.s) AS x \
             UNION ALL SELECT generate_series(pg_snapshot_xmax(t.s)::text::bigint, t.n::text::bigint - 1)) \
FROM (SELECT pg_current_snapshot() AS s, pg_current_xact_id() AS n, \
             set_config('synchronous_commit', 'off', true) AS a) AS t";
pub(super) const STILL_OPEN: &str = "\
SELECT COALESCE(array_agg(x), '{}') FROM unnest($1::bigint[]) AS x \
WHERE pg_xact_status(x::text::xid8) = 'in progress'";

// Taking a transaction id makes the commit write a record and wait for the WAL flush: the probe
// feels what a service's commits feel (CPU, locks on the WAL, the disk), not only the CPU. The id
// taken is also the count of ids handed out: every writing transaction's, live.
pub(super) const PROBE: &str = "\
SELECT d.xact_commit + d.xact_rollback, txid_current() FROM pg_stat_database d \
WHERE d.datname = current_database()";

pub(super) const LIVE_OWNERS: &str = "SELECT count(*) FROM outbox_relays WHERE expires_at > now()";

/// The store's own connections' planner settings (own.rs, `PLANNER_SETTINGS`) for the current
/// transaction only (several statements: the simple protocol), when those connections are refused.
pub(super) static LOCAL_SETTINGS: LazyLock<String> = LazyLock::new(|| {
    let set: Vec<String> = super::own::PLANNER_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET LOCAL {name} = {value}"))
        .collect();
    set.join("; ")
});

// A key's row is claimable only if no earlier row of that key is waiting and the key is not parked;
// with ORDER BY pos (which follows seq per key) the rows taken of each key form a prefix.
// Positions of the batches in flight are left out.
//
// A plain snapshot read, on purpose without `FOR UPDATE SKIP LOCKED`: the lease already gives the
// lane to one relay, and SKIP LOCKED would break the prefix. A row locked by anyone else (a relay
// that stalled inside its claim and lost the lane, an operator's session) would be skipped while
// the later rows of its key were returned and published ahead of it (crashes.rs caught exactly this
// with a relay frozen by SIGSTOP).
//
// A row that was never delayed nor failed (`available_at = created_at`) is claimable whatever the
// clocks say: its `created_at` is its writer's transaction start, which can be later than this
// claim's `now()` although the writer committed first (the claim's transaction began a round trip
// before its snapshot). Comparing it with `now()` would leave it out while its key's next row, from
// a writer that began earlier but committed after it, was claimed: a reordering that
// `relay::ten_thousand_messages...` caught. Rows that do wait (delay, backoff) are exactly the
// ones the predecessor check (and its partial index) looks at: a row waits exactly when
// `available_at <> created_at AND available_at > now()`, the same condition for skipping a row and
// for holding back its key's later rows (migration 0004 makes the index's predicate match).
//
// The lanes that claim at the same moment share the statement (`combine.rs`): one request per
// element of $1-$4 (lane, owner, epoch, limit), each answered by the rows of its own lateral
// subquery, tagged with its ordinal; $5/$6 pair each position in flight with its request's ordinal.
pub(super) const CLAIM: &str = "SELECT r.ord, m.pos, m.id, m.lane, m.topic, m.key, m.seq, m.payload, m.headers, m.attempts, m.created_at, \
  (SELECT s.id FROM outbox_source s) AS source \
FROM (SELECT q.lane, q.lim, q.ord, \
        ARRAY(SELECT f.pos FROM unnest($5::bigint[], $6::bigint[]) AS f(ord, pos) WHERE f.ord = q.ord) AS skip \
      FROM unnest($1::int[], $2::text[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS q(lane, owner, epoch, lim, ord) \
      WHERE EXISTS (SELECT 1 FROM outbox_leases WHERE lane = q.lane AND owner = q.owner AND epoch = q.epoch)) AS r \
CROSS JOIN LATERAL (SELECT m.* FROM outbox_messages m \
  WHERE m.lane = r.lane AND NOT (m.available_at <> m.created_at AND m.available_at > now()) \
  AND (m.key IS NULL OR ( \
        NOT EXISTS (SELECT 1 FROM outbox_messages p \
                    WHERE p.key = m.key AND p.seq < m.seq \
                      AND p.available_at <> p.created_at AND p.available_at > now()) \
    AND NOT EXISTS (SELECT 1 FROM outbox_dead_letters d WHERE d.key = m.key AND d.parked))) \
  AND m.pos <> ALL(r.skip) \
  ORDER BY m.pos LIMIT r.lim) AS m \
ORDER BY r.ord, m.pos";

// The marks commit without waiting for the WAL flush (`synchronous_commit` off for their own
// transaction only: `set_config(..., true)` ends with the statement). A mark the database forgets in
// a crash only sends its rows again, which at-least-once delivery allows (a forgotten failure: one
// attempt more, sooner); the messages themselves were committed by the service's transactions, with
// its own setting. The relay's commits then stop
// queueing for the flush with the service's, and a lane's next claim does not wait for one either.
const ASYNC_COMMIT: &str = "s AS (SELECT set_config('synchronous_commit', 'off', true))";

// The marks of lanes confirmed at the same moment share the statement (`combine.rs`): one request
// per element of $1-$3 (lane, owner, epoch); $4-$6 give each delivered row its request's ordinal,
// its lane and its position ($7/$8: its partition and offset, kept). The answer says, per request,
// whether its lease was held. Each row carries its own lane so the delete probes the primary key on
// (lane, pos) from one row of the unnest: with the lane taken from the lease rows instead, stale
// statistics (a busy queue table between two autovacuums) made PostgreSQL probe on `pos` alone, a
// scan of the whole index per row (tests/pg/plans.rs).
//
// The leases are read, not locked. A mark deletes only rows the broker confirmed, which is right
// whoever holds the lane by then: a relay that took the lane over meanwhile and sends them again
// sends duplicates, as after any takeover, and its own mark of them finds nothing. Locked
// `FOR SHARE`, every mark running held up the renewal (which updates every lease row of its relay),
// and every mark of a lane it had locked waited behind it: one mark held up stalled every lane
// (tests/pg/renewal.rs). And PostgreSQL lets a share locker pass a writer that waits, so marks that
// overlap without a gap can hold the renewal off for as long as they keep coming: at 5,000 msg/s a
// renewal of 42 s was logged beside marks of 1-44 s, and the relay's 32 leases had expired.
const MARK_LEASES: &str = "\
l AS (SELECT q.ord, q.lane FROM unnest($1::int[], $2::text[], $3::bigint[]) WITH ORDINALITY AS q(lane, owner, epoch, ord) \
      JOIN outbox_leases o ON o.lane = q.lane AND o.owner = q.owner AND o.epoch = q.epoch)";

const MARK_HELD: &str = "\
SELECT EXISTS (SELECT 1 FROM l WHERE l.ord = q.ord) \
FROM generate_series(1, cardinality($1::int[])::bigint) AS q(ord), s ORDER BY q.ord";

pub(super) fn mark_published_delete() -> String {
    format!(
        "WITH {ASYNC_COMMIT}, {MARK_LEASES}, \
d AS (DELETE FROM outbox_messages m USING unnest($4::bigint[], $5::int[], $6::bigint[]) AS p(ord, lane, pos) \
      WHERE m.lane = p.lane AND m.pos = p.pos AND EXISTS (SELECT 1 FROM l WHERE l.ord = p.ord) RETURNING 1) \
{MARK_HELD}"
    )
}

pub(super) fn mark_published_keep() -> String {
    format!(
        "WITH {ASYNC_COMMIT}, {MARK_LEASES}, \
d AS (DELETE FROM outbox_messages m \
      USING unnest($4::bigint[], $5::int[], $6::bigint[], $7::int[], $8::bigint[]) AS p(ord, lane, pos, part, off) \
      WHERE m.lane = p.lane AND m.pos = p.pos AND EXISTS (SELECT 1 FROM l WHERE l.ord = p.ord) \
      RETURNING m.id, m.topic, m.key, m.seq, p.part, p.off, m.created_at), \
i AS (INSERT INTO outbox_published (id, topic, key, seq, kafka_partition, kafka_offset, created_at) \
      SELECT * FROM d ON CONFLICT (id) DO NOTHING) \
{MARK_HELD}"
    )
}

// A failure mark and a dead letter lock their lease (no takeover comes between the check and the
// write), but only once they hold their row: waiting for a row held elsewhere with the lease
// locked held up the renewal, which locks every lease of its relay (tests/pg/renewal.rs). `r`
// takes the row (it may be gone: the count is 0 then), and `l` is joined to it, so the row's lock
// comes first.
const ROW_THEN_LEASE: &str = "\
r AS (SELECT 1 FROM outbox_messages WHERE lane = $1 AND pos = $4 FOR UPDATE), \
l AS (SELECT 1 FROM outbox_leases, (SELECT count(*) FROM r) AS held_row \
      WHERE lane = $1 AND owner = $2 AND epoch = $3 FOR SHARE OF outbox_leases)";

pub(super) fn mark_failed() -> String {
    format!(
        "WITH {ASYNC_COMMIT}, {ROW_THEN_LEASE}, \
u AS (UPDATE outbox_messages SET attempts = attempts + 1, last_error = $5, \
             available_at = now() + $6::bigint * interval '1 millisecond' \
      WHERE lane = $1 AND pos = $4 AND EXISTS (SELECT 1 FROM l) RETURNING 1) \
SELECT EXISTS (SELECT 1 FROM l), (SELECT count(*) FROM u) FROM s"
    )
}

pub(super) fn dead_letter() -> String {
    format!(
        "WITH {ROW_THEN_LEASE}, \
d AS (DELETE FROM outbox_messages WHERE lane = $1 AND pos = $4 AND EXISTS (SELECT 1 FROM l) RETURNING *), \
i AS (INSERT INTO outbox_dead_letters \
        (id, lane, pos, topic, key, seq, payload, headers, created_at, attempts, error, parked) \
      SELECT id, lane, pos, topic, key, seq, payload, headers, created_at, attempts + 1, $5, $6 FROM d \
      ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, parked = EXCLUDED.parked, \
        attempts = EXCLUDED.attempts, dead_at = now() RETURNING 1) \
SELECT EXISTS (SELECT 1 FROM l), (SELECT count(*) FROM i)"
    )
}

pub(super) const STATUS_BACKLOG: &str = "\
SELECT count(*), EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 FROM outbox_messages";
pub(super) const STATUS_DEAD: &str = "SELECT count(*) FROM outbox_dead_letters";
// A lease never taken ('-infinity') has no expiry; one beyond what the driver decodes ('infinity',
// or past the year 262143) reads as the end of 9999, still held.
pub(super) const STATUS_LANES: &str = "\
SELECT lane, owner, epoch, NULLIF(LEAST(expires_at, '9999-12-31 23:59:59+00'), '-infinity') \
FROM outbox_leases ORDER BY lane";

pub(super) const DEAD_LETTERS: &str = "\
SELECT id, topic, key, seq, attempts, error, parked, dead_at FROM outbox_dead_letters \
ORDER BY dead_at, pos LIMIT $1";

// Back into the outbox with its original position and seq, so a parked key resumes in order: one
// statement, so no transaction of its own.
pub(super) const RETRY_DEAD_LETTER: &[&str] = &[concat!(
    "WITH d AS (DELETE FROM outbox_dead_letters WHERE id = $1 RETURNING *) \
INSERT INTO outbox_messages \
  (lane, pos, id, topic, key, seq, payload, headers, created_at, available_at, attempts, last_error) \
OVERRIDING SYSTEM VALUE \
SELECT lane, pos, id, topic, key, seq, payload, headers, created_at, now(), 0, error \
FROM d, (SELECT pg_notify('",
    notify_channel!(),
    "', d.lane::text) FROM d) AS w \
RETURNING 1"
)];
pub(super) const RETRY_DEAD_LETTER_LOCK: Option<&str> = None;

// A parked key moves on once its dead letter is gone: its lane is woken, as by a retry.
pub(super) const DISCARD_DEAD_LETTER: &str = concat!(
    "WITH d AS (DELETE FROM outbox_dead_letters WHERE id = $1 RETURNING lane, parked) \
SELECT CASE WHEN parked THEN pg_notify('",
    notify_channel!(),
    "', lane::text) END FROM d"
);

pub(super) const CLEANUP_PUBLISHED: &str = "\
DELETE FROM outbox_published WHERE id IN ( \
  SELECT id FROM outbox_published WHERE published_at < now() - $1::bigint * interval '1 millisecond' \
  LIMIT $2 FOR UPDATE SKIP LOCKED)";

// Schema migrations, tracked in our own table so the application's sqlx migrator never sees them.
pub(super) const MIGRATIONS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS outbox_schema_migrations ( \
  version BIGINT PRIMARY KEY, description TEXT NOT NULL, checksum BYTEA NOT NULL, \
  installed_on TIMESTAMPTZ NOT NULL DEFAULT now())";
pub(super) const MIGRATIONS_LOCK: &str = "SELECT pg_advisory_xact_lock(7262616210)";
pub(super) const MIGRATIONS_APPLIED: &str = "SELECT version, checksum FROM outbox_schema_migrations";
pub(super) const MIGRATIONS_RECORD: &str = "\
INSERT INTO outbox_schema_migrations (version, description, checksum) VALUES ($1, $2, $3)";
