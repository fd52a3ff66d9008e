-- The outbox database's source id, and the inbox scoped by it (crate outbox-inbox). Applied by
-- outbox::sqlite::migrate(&pool) after 0001 and 0002, or copy it. Same meaning as
-- migrations/postgres/0003_outbox_source.sql.

-- The stable id of this outbox database: one row, a random (version 4) UUID made once, here. Sent
-- with every message as the `outbox-source` header. Replace it only before the first message is
-- published.
CREATE TABLE outbox_source (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id  TEXT    NOT NULL CHECK (id <> '')
);
INSERT INTO outbox_source (one, id) VALUES (1, lower(
    hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-'
    || substr('89AB', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))));

-- Inbox records are scoped by (consumer, source, key); '' for messages without the header and for
-- rows written before this migration. SQLite cannot change a primary key: the tables are rebuilt
-- (inside the migration's transaction).
CREATE TABLE outbox_inbox_keys_new (
    consumer   TEXT    NOT NULL,
    source     TEXT    NOT NULL DEFAULT '',
    key        TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    prev_seq   INTEGER,
    gap_from   INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, source, key)
) WITHOUT ROWID;
INSERT INTO outbox_inbox_keys_new (consumer, source, key, seq, prev_seq, gap_from, updated_at)
    SELECT consumer, '', key, seq, prev_seq, gap_from, updated_at FROM outbox_inbox_keys;
DROP TABLE outbox_inbox_keys;
ALTER TABLE outbox_inbox_keys_new RENAME TO outbox_inbox_keys;

-- Open gaps are kept until filled (Inbox::cleanup no longer deletes them): no index on created_at.
CREATE TABLE outbox_inbox_gaps_new (
    consumer   TEXT    NOT NULL,
    source     TEXT    NOT NULL DEFAULT '',
    key        TEXT    NOT NULL,
    from_seq   INTEGER NOT NULL,
    to_seq     INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, source, key, from_seq),
    CHECK (from_seq <= to_seq)
);
INSERT INTO outbox_inbox_gaps_new (consumer, source, key, from_seq, to_seq, created_at)
    SELECT consumer, '', key, from_seq, to_seq, created_at FROM outbox_inbox_gaps;
DROP TABLE outbox_inbox_gaps;
ALTER TABLE outbox_inbox_gaps_new RENAME TO outbox_inbox_gaps;

-- Messages parked under GapPolicy::Hold until their predecessor is applied (headers encoded as in
-- the PostgreSQL schema).
CREATE TABLE outbox_inbox_parked (
    consumer   TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    message_id BLOB    NOT NULL,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    headers    BLOB    NOT NULL,
    parked_at  INTEGER NOT NULL,
    PRIMARY KEY (consumer, source, key, seq)
);
