-- Inbox schema for PostgreSQL (crate outbox-inbox): consumer-side idempotency. Every object is
-- prefixed outbox_. Applied by outbox::postgres::migrate(&pool) with the outbox schema, or copy it.

-- Keyed messages: per (consumer, key) the highest seq applied. A message of the key with seq <= seq
-- is a duplicate, forever, at one row per key (never per message). Locking this row serializes
-- concurrent deliveries of one key. prev_seq is the highest seq before the last advance (NULL after
-- the first message), so one upsert tells whether the message skipped a gap.
CREATE TABLE outbox_inbox_keys (
    consumer   TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    prev_seq   BIGINT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key)
);

-- Unkeyed messages: one row per processed message id, kept for the consumer's retention window and
-- deleted in small batches by Inbox::cleanup.
CREATE TABLE outbox_inbox_messages (
    consumer     TEXT        NOT NULL,
    message_id   UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
-- Used by the cleanup to find one consumer's expired rows without scanning the table.
CREATE INDEX outbox_inbox_messages_processed_at ON outbox_inbox_messages (consumer, processed_at);
