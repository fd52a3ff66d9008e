-- outbox schema for MySQL 8.0.13+ and MariaDB 10.6+ (InnoDB). Every object is prefixed outbox_.
-- Apply with outbox::mysql::migrate(&pool) (tracked in outbox_schema_migrations, so it never
-- collides with the application's own _sqlx_migrations), or copy this file into your own migrations.
--
-- Times are DATETIME(6) in UTC, always written from UTC_TIMESTAMP(6) (the database clock, whatever
-- the session time_zone). DDL is not transactional in MySQL: the statements are idempotent
-- (IF NOT EXISTS, INSERT IGNORE) so that a run interrupted halfway can simply be repeated.
-- Keys and owners are binary strings: compared byte for byte, like PostgreSQL text (no collation,
-- no trailing-space padding). Keys have no length limit; relay owner names up to 1024 bytes.

-- Committed messages waiting for the relay. Rows are deleted (or moved to outbox_published) once the
-- broker confirmed them, so the table holds only the backlog.
CREATE TABLE IF NOT EXISTS outbox_messages (
    lane         INT          NOT NULL,
    -- Insertion position: orders rows within a lane. Per key it follows seq, because the per-key
    -- counter row is locked before the message row is inserted. Never used as a cursor.
    pos          BIGINT       NOT NULL AUTO_INCREMENT,
    id           BINARY(16)   NOT NULL,
    topic        VARCHAR(249) CHARACTER SET ascii NOT NULL,
    `key`        LONGBLOB,
    seq          BIGINT,
    payload      LONGBLOB     NOT NULL,
    headers      LONGTEXT,
    created_at   DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    available_at DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    attempts     INT          NOT NULL DEFAULT 0,
    last_error   LONGTEXT,
    PRIMARY KEY (lane, pos),
    -- InnoDB wants the AUTO_INCREMENT column first in some index. Unique, so that a lookup of one
    -- row through it locks that row only (a non-unique index takes next-key locks that stall
    -- enqueuers).
    UNIQUE KEY outbox_messages_pos (pos),
    -- Used by the claim to find a key's earlier rows that are waiting (backoff or delay).
    KEY outbox_messages_key_seq (`key`(255), seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Per-key sequence counter. Locking this row serializes writers of one key, so seq order is commit
-- order. One row per key ever used (grows with keys, not messages). The primary key is the SHA-256
-- of the key, so keys of any length fit in an index.
CREATE TABLE IF NOT EXISTS outbox_keys (
    key_hash BINARY(32) NOT NULL PRIMARY KEY,
    `key`    LONGBLOB   NOT NULL,
    seq      BIGINT     NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One lease row per lane. epoch grows on every takeover; writes by the relay check it.
-- owner and expires_at are NULL while the lane is free.
CREATE TABLE IF NOT EXISTS outbox_leases (
    lane       INT         NOT NULL PRIMARY KEY,
    owner      VARBINARY(1024),
    epoch      BIGINT      NOT NULL DEFAULT 0,
    expires_at DATETIME(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
INSERT IGNORE INTO outbox_leases (lane) VALUES
    (0), (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15),
    (16), (17), (18), (19), (20), (21), (22), (23), (24), (25), (26), (27), (28), (29), (30), (31);

-- Live relays (heartbeat with every lease renewal), so lanes are shared fairly: a relay that holds
-- no lane yet still counts, and the others hand lanes back for it.
CREATE TABLE IF NOT EXISTS outbox_relays (
    owner      VARBINARY(1024) NOT NULL PRIMARY KEY,
    expires_at DATETIME(6)     NOT NULL,
    KEY outbox_relays_expires_at (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Messages that could not be published. parked = the key waits for an operator (policy park).
CREATE TABLE IF NOT EXISTS outbox_dead_letters (
    id         BINARY(16)   NOT NULL PRIMARY KEY,
    lane       INT          NOT NULL,
    pos        BIGINT       NOT NULL,
    topic      VARCHAR(249) CHARACTER SET ascii NOT NULL,
    `key`      LONGBLOB,
    seq        BIGINT,
    payload    LONGBLOB     NOT NULL,
    headers    LONGTEXT,
    created_at DATETIME(6)  NOT NULL,
    attempts   INT          NOT NULL,
    error      LONGTEXT     NOT NULL,
    parked     BOOLEAN      NOT NULL,
    dead_at    DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    KEY outbox_dead_letters_key (`key`(255), parked),
    KEY outbox_dead_letters_dead_at (dead_at, pos)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Published rows, kept only when the relay is configured to keep them (audit), with where the broker
-- stored them. Cleaned up in small batches.
CREATE TABLE IF NOT EXISTS outbox_published (
    id              BINARY(16)   NOT NULL PRIMARY KEY,
    topic           VARCHAR(249) CHARACTER SET ascii NOT NULL,
    `key`           LONGBLOB,
    seq             BIGINT,
    kafka_partition INT          NOT NULL,
    kafka_offset    BIGINT       NOT NULL,
    created_at      DATETIME(6)  NOT NULL,
    published_at    DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    KEY outbox_published_published_at (published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
