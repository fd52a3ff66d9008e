-- outbox schema for SQLite 3.35+. Every object is prefixed outbox_.
-- Apply with outbox::sqlite::migrate(&pool) (tracked in outbox_schema_migrations, so it never
-- collides with the application's own _sqlx_migrations), or copy this file into your own migrations.
--
-- Times are INTEGER microseconds since the Unix epoch (UTC), compared numerically; "now" comes from
-- SQLite's own clock (julianday('now')). Ids are 16-byte BLOBs.

-- Committed messages waiting for the relay. Rows are deleted (or moved to outbox_published) once the
-- broker confirmed them, so the table holds only the backlog.
CREATE TABLE outbox_messages (
    -- Insertion position: orders rows within a lane. SQLite has one writer at a time, so per key it
    -- follows seq (and commit order). AUTOINCREMENT: a position is never handed out twice, so a dead
    -- letter can come back with its original position. Never used as a cursor.
    pos          INTEGER PRIMARY KEY AUTOINCREMENT,
    lane         INTEGER NOT NULL,
    id           BLOB    NOT NULL,
    topic        TEXT    NOT NULL,
    key          TEXT,
    seq          INTEGER,
    payload      BLOB    NOT NULL,
    headers      TEXT,
    created_at   INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX outbox_messages_lane_pos ON outbox_messages (lane, pos);
-- Used by the claim to find a key's earlier rows that are waiting (backoff or delay).
CREATE INDEX outbox_messages_key_seq ON outbox_messages (key, seq) WHERE key IS NOT NULL;

-- Per-key sequence counter, taken before the message row is inserted. One row per key ever used.
CREATE TABLE outbox_keys (
    key TEXT    NOT NULL PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;

-- One lease row per lane. epoch grows on every takeover; writes by the relay check it.
-- owner and expires_at are NULL while the lane is free.
CREATE TABLE outbox_leases (
    lane       INTEGER PRIMARY KEY,
    owner      TEXT,
    epoch      INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER
);
INSERT INTO outbox_leases (lane) VALUES
    (0), (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15),
    (16), (17), (18), (19), (20), (21), (22), (23), (24), (25), (26), (27), (28), (29), (30), (31);

-- Live relays (heartbeat with every lease renewal), so lanes are shared fairly: a relay that holds
-- no lane yet still counts, and the others hand lanes back for it.
CREATE TABLE outbox_relays (
    owner      TEXT    NOT NULL PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Messages that could not be published. parked = the key waits for an operator (policy park).
CREATE TABLE outbox_dead_letters (
    id         BLOB    NOT NULL PRIMARY KEY,
    lane       INTEGER NOT NULL,
    pos        INTEGER NOT NULL,
    topic      TEXT    NOT NULL,
    key        TEXT,
    seq        INTEGER,
    payload    BLOB    NOT NULL,
    headers    TEXT,
    created_at INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    error      TEXT    NOT NULL,
    parked     INTEGER NOT NULL,
    dead_at    INTEGER NOT NULL
);
CREATE INDEX outbox_dead_letters_parked_key ON outbox_dead_letters (key) WHERE parked;

-- Published rows, kept only when the relay is configured to keep them (audit), with where the broker
-- stored them. Cleaned up in small batches.
CREATE TABLE outbox_published (
    id              BLOB    NOT NULL PRIMARY KEY,
    topic           TEXT    NOT NULL,
    key             TEXT,
    seq             INTEGER,
    kafka_partition INTEGER NOT NULL,
    kafka_offset    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    published_at    INTEGER NOT NULL
);
CREATE INDEX outbox_published_published_at ON outbox_published (published_at);
