-- Inbox schema for PostgreSQL (crate outbox-inbox): consumer-side idempotency. Every object is
-- prefixed outbox_. Applied by outbox::postgres::migrate(&pool) with the outbox schema, or copy it.

-- Keyed messages: per (consumer, key) the highest seq applied. A message of the key with seq <= seq
-- is a duplicate unless it falls in one of the key's open gaps (outbox_inbox_gaps), at one row per
-- key (never per message). Locking this row serializes concurrent deliveries of one key. prev_seq is
-- the highest seq before the last advance (NULL after the first message), so one upsert tells
-- whether the message skipped a gap. gap_from is a lower bound of the key's open gaps (NULL: none):
-- only a seq in [gap_from, seq) makes the inbox look at the gaps table.
CREATE TABLE outbox_inbox_keys (
    consumer   TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    prev_seq   BIGINT,
    gap_from   BIGINT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key)
);

-- Open gaps of keyed messages: seqs from_seq..=to_seq of (consumer, key) were skipped when a higher
-- seq was accepted (GapPolicy::Accept) and have not arrived since. A late message in a gap is
-- processed, and its seq is cut out of the range (shrunk, split or deleted) in its transaction.
-- Ranges of one key are disjoint and below the key's seq; one row per open gap, never per message.
-- Rows older than the consumer's retention window are deleted by Inbox::cleanup (created_at is
-- kept when a range is split).
CREATE TABLE outbox_inbox_gaps (
    consumer   TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    from_seq   BIGINT      NOT NULL,
    to_seq     BIGINT      NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key, from_seq),
    CHECK (from_seq <= to_seq)
);
-- Used by the cleanup to find one consumer's expired gaps without scanning the table.
CREATE INDEX outbox_inbox_gaps_created_at ON outbox_inbox_gaps (consumer, created_at);

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
