-- The outbox database's source id, and the inbox scoped by it (crate outbox-inbox). Applied by
-- outbox::postgres::migrate(&pool) after 0001 and 0002, or copy it.

-- The stable id of this outbox database: one row, a random UUID made once, here. The claim reads it
-- and the relay sends it with every message as the `outbox-source` header: keys and their seqs are
-- numbered per outbox database, so a consumer reading the messages of several outboxes needs it to
-- tell their sequences apart. Replace the id (before the first message is published) to give the
-- database a name of your choice; never change it afterwards, consumers scope their records by it.
CREATE TABLE outbox_source (
    one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    id  TEXT    NOT NULL CHECK (id <> '')
);
INSERT INTO outbox_source (id) VALUES (gen_random_uuid()::text);

-- Inbox records are scoped by (consumer, source, key): `source` is the message's `outbox-source`
-- header, '' for a message without one (sent by a relay that predates it). Rows written before this
-- migration get ''; the inbox hands such a row over to the first source that sends its key.
ALTER TABLE outbox_inbox_keys
    ADD COLUMN source TEXT NOT NULL DEFAULT '',
    DROP CONSTRAINT outbox_inbox_keys_pkey,
    ADD PRIMARY KEY (consumer, source, key);

-- Open gaps are kept until a late message fills them (Inbox::cleanup no longer deletes them), so
-- the index on created_at is not needed any more.
DROP INDEX outbox_inbox_gaps_created_at;
ALTER TABLE outbox_inbox_gaps
    ADD COLUMN source TEXT NOT NULL DEFAULT '',
    DROP CONSTRAINT outbox_inbox_gaps_pkey,
    ADD PRIMARY KEY (consumer, source, key, from_seq);

-- Messages parked under GapPolicy::Hold: a keyed message whose predecessor had not been applied,
-- kept whole (id, topic, payload, headers) until the predecessor is applied; the inbox then applies
-- it in the predecessor's transaction and deletes the row. Seqs of a key here are all above the
-- key's highest applied seq (outbox_inbox_keys.seq). headers: the delivered headers, in order, each
-- as a 4-byte big-endian name length, the name (UTF-8), a 4-byte big-endian value length, the value.
CREATE TABLE outbox_inbox_parked (
    consumer   TEXT        NOT NULL,
    source     TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    message_id UUID        NOT NULL,
    topic      TEXT        NOT NULL,
    payload    BYTEA       NOT NULL,
    headers    BYTEA       NOT NULL,
    parked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, source, key, seq)
);
