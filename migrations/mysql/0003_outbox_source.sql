-- The outbox database's source id, and the inbox scoped by it (crate outbox-inbox), for MySQL 8.0.13+
-- and MariaDB 10.6+. Applied by outbox::mysql::migrate(&pool) after 0001 and 0002, or copy it. Same
-- meaning as migrations/postgres/0003_outbox_source.sql. DDL is not transactional in MySQL, so every
-- statement can run again after an interrupted run: tables IF NOT EXISTS, the source row only if
-- there is none, and each ALTER TABLE (one atomic statement) only if its column is still missing.

-- The stable id of this outbox database: one row, a UUID made once, here. Sent with every message
-- as the `outbox-source` header. Replace it only before the first message is published.
CREATE TABLE IF NOT EXISTS outbox_source (
    one TINYINT      NOT NULL DEFAULT 1 PRIMARY KEY,
    id  VARCHAR(255) NOT NULL,
    CONSTRAINT outbox_source_one CHECK (one = 1),
    CONSTRAINT outbox_source_id CHECK (id <> '')
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
INSERT INTO outbox_source (one, id) VALUES (1, UUID()) ON DUPLICATE KEY UPDATE one = one;

-- Inbox records are scoped by (consumer, source, key): `source` is the message's `outbox-source`
-- header (at most 255 bytes, compared byte for byte), '' for a message without one and for rows
-- written before this migration.
SET @outbox_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
     WHERE table_schema = DATABASE() AND table_name = 'outbox_inbox_keys' AND column_name = 'source') = 0,
    'ALTER TABLE outbox_inbox_keys ADD COLUMN `source` VARBINARY(255) NOT NULL DEFAULT '''' AFTER consumer, DROP PRIMARY KEY, ADD PRIMARY KEY (consumer, `source`, key_hash)',
    'DO 0');
PREPARE outbox_ddl FROM @outbox_ddl;
EXECUTE outbox_ddl;
DEALLOCATE PREPARE outbox_ddl;

-- Open gaps are kept until filled (Inbox::cleanup no longer deletes them): no index on created_at.
SET @outbox_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
     WHERE table_schema = DATABASE() AND table_name = 'outbox_inbox_gaps' AND column_name = 'source') = 0,
    'ALTER TABLE outbox_inbox_gaps ADD COLUMN `source` VARBINARY(255) NOT NULL DEFAULT '''' AFTER consumer, DROP PRIMARY KEY, ADD PRIMARY KEY (consumer, `source`, key_hash, from_seq), DROP INDEX outbox_inbox_gaps_created_at',
    'DO 0');
PREPARE outbox_ddl FROM @outbox_ddl;
EXECUTE outbox_ddl;
DEALLOCATE PREPARE outbox_ddl;
SET @outbox_ddl = NULL;

-- Messages parked under GapPolicy::Hold until their predecessor is applied (headers encoded as in
-- the PostgreSQL schema). Found by (consumer, source, key_hash, seq); `key` is kept for people
-- reading the table.
CREATE TABLE IF NOT EXISTS outbox_inbox_parked (
    consumer   VARBINARY(1024) NOT NULL,
    `source`   VARBINARY(255)  NOT NULL,
    key_hash   BINARY(32)      NOT NULL,
    `key`      LONGBLOB        NOT NULL,
    seq        BIGINT          NOT NULL,
    message_id BINARY(16)      NOT NULL,
    topic      VARCHAR(255)    NOT NULL,
    payload    LONGBLOB        NOT NULL,
    headers    LONGBLOB        NOT NULL,
    parked_at  DATETIME(6)     NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, `source`, key_hash, seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
