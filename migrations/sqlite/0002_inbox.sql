-- Inbox schema for SQLite (crate outbox-inbox): consumer-side idempotency. Every object is prefixed
-- outbox_. Applied by outbox::sqlite::migrate(&pool) with the outbox schema, or copy it.
-- Times are INTEGER microseconds since the Unix epoch (SQLite's clock), as in 0001_outbox.sql.

-- Keyed messages: per (consumer, key) the highest seq applied; one row per key, never per message.
-- gap_from is a lower bound of the key's open gaps (NULL: none), as in the PostgreSQL schema.
CREATE TABLE outbox_inbox_keys (
    consumer   TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    prev_seq   INTEGER,
    gap_from   INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, key)
) WITHOUT ROWID;

-- Open gaps of keyed messages: seqs from_seq..=to_seq skipped when a higher seq was accepted and not
-- arrived since; a late message in a gap is processed and cut out of the range. Deleted after the
-- retention window.
CREATE TABLE outbox_inbox_gaps (
    consumer   TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    from_seq   INTEGER NOT NULL,
    to_seq     INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, key, from_seq),
    CHECK (from_seq <= to_seq)
);
CREATE INDEX outbox_inbox_gaps_created_at ON outbox_inbox_gaps (consumer, created_at);

-- Unkeyed messages: one row per processed message id, deleted after the retention window.
CREATE TABLE outbox_inbox_messages (
    consumer     TEXT    NOT NULL,
    message_id   BLOB    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX outbox_inbox_messages_processed_at ON outbox_inbox_messages (consumer, processed_at);
