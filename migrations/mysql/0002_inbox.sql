-- Inbox schema for MySQL 8.0.13+ and MariaDB 10.6+ (crate outbox-inbox): consumer-side idempotency.
-- Every object is prefixed outbox_. Applied by outbox::mysql::migrate(&pool) with the outbox schema
-- (tracked in outbox_schema_migrations), or copy it into your own migrations.
--
-- Same tables and meaning as migrations/postgres/0002_inbox.sql, in the conventions of
-- 0001_outbox.sql: times are DATETIME(6) in UTC from UTC_TIMESTAMP(6); consumer names and keys are
-- binary strings (compared byte for byte, like PostgreSQL text); a key is found by its SHA-256
-- (key_hash), so keys of any length fit in an index; consumer names up to 1024 bytes. The statements
-- are idempotent (IF NOT EXISTS): DDL is not transactional in MySQL, an interrupted run is repeated.

-- Keyed messages: per (consumer, key) the highest seq applied. A message of the key with seq <= seq
-- is a duplicate unless it falls in one of the key's open gaps (outbox_inbox_gaps), at one row per
-- key (never per message). Locking this row serializes concurrent deliveries of one key. prev_seq is
-- the highest seq before the last advance (NULL after the first message). gap_from is a lower bound
-- of the key's open gaps (NULL: none): only a seq in [gap_from, seq) makes the inbox look at the
-- gaps table. `key` is kept for people reading the table; the inbox uses key_hash.
CREATE TABLE IF NOT EXISTS outbox_inbox_keys (
    consumer   VARBINARY(1024) NOT NULL,
    key_hash   BINARY(32)      NOT NULL,
    `key`      LONGBLOB        NOT NULL,
    seq        BIGINT          NOT NULL,
    prev_seq   BIGINT,
    gap_from   BIGINT,
    updated_at DATETIME(6)     NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, key_hash)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Open gaps of keyed messages: seqs from_seq..=to_seq of (consumer, key) were skipped when a higher
-- seq was accepted (GapPolicy::Accept) and have not arrived since. A late message in a gap is
-- processed, and its seq is cut out of the range (shrunk, split or deleted) in its transaction.
-- Ranges of one key are disjoint and below the key's seq; one row per open gap, never per message.
-- Rows older than the consumer's retention window are deleted by Inbox::cleanup (created_at is
-- kept when a range is split).
CREATE TABLE IF NOT EXISTS outbox_inbox_gaps (
    consumer   VARBINARY(1024) NOT NULL,
    key_hash   BINARY(32)      NOT NULL,
    from_seq   BIGINT          NOT NULL,
    to_seq     BIGINT          NOT NULL,
    created_at DATETIME(6)     NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, key_hash, from_seq),
    -- Used by the cleanup to find one consumer's expired gaps without scanning the table.
    KEY outbox_inbox_gaps_created_at (consumer, created_at),
    CONSTRAINT outbox_inbox_gaps_range CHECK (from_seq <= to_seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Unkeyed messages: one row per processed message id, kept for the consumer's retention window and
-- deleted in small batches by Inbox::cleanup.
CREATE TABLE IF NOT EXISTS outbox_inbox_messages (
    consumer     VARBINARY(1024) NOT NULL,
    message_id   BINARY(16)      NOT NULL,
    processed_at DATETIME(6)     NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, message_id),
    -- Used by the cleanup to find one consumer's expired rows without scanning the table.
    KEY outbox_inbox_messages_processed_at (consumer, processed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
