-- outbox schema for PostgreSQL. Every object is prefixed outbox_.
-- Apply with outbox::postgres::migrate(&pool) (tracked in outbox_schema_migrations, so it never
-- collides with the application's own _sqlx_migrations), or copy this file into your own migrations.

-- Committed messages waiting for the relay. Rows are deleted (or moved to outbox_published) once the
-- broker confirmed them, so the table holds only the backlog.
CREATE TABLE outbox_messages (
    lane         INT         NOT NULL,
    -- Insertion position: orders rows within a lane. Per key it follows seq, because the per-key
    -- counter row is locked before the message row is inserted. Never used as a cursor.
    pos          BIGINT      GENERATED ALWAYS AS IDENTITY,
    id           UUID        NOT NULL,
    topic        TEXT        NOT NULL,
    key          TEXT,
    seq          BIGINT,
    payload      BYTEA       NOT NULL,
    headers      TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts     INT         NOT NULL DEFAULT 0,
    last_error   TEXT,
    PRIMARY KEY (lane, pos)
);
-- Used by the claim to find a key's earlier rows that are waiting (backoff or delay). Only such
-- rows are indexed: a row can wait only if it failed (attempts > 0) or was delayed, so plain
-- enqueues never touch this index and the claim's check is one probe of a tiny index.
CREATE INDEX outbox_messages_waiting ON outbox_messages (key, seq)
    WHERE key IS NOT NULL AND (attempts > 0 OR available_at > created_at);

-- Per-key sequence counter. Locking this row serializes writers of one key, so seq order is commit
-- order. One row per key ever used (grows with keys, not messages).
CREATE TABLE outbox_keys (
    key TEXT   PRIMARY KEY,
    seq BIGINT NOT NULL
);

-- One lease row per lane. epoch grows on every takeover; writes by the relay check it.
-- idle: the owning relay found the lane empty and waits for a wake-up. Enqueue sends NOTIFY only
-- then: NOTIFY serializes committing transactions, so a busy relay (which will claim the row anyway)
-- is not notified.
CREATE TABLE outbox_leases (
    lane       INT         PRIMARY KEY,
    owner      TEXT,
    epoch      BIGINT      NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    idle       BOOLEAN     NOT NULL DEFAULT false
);
INSERT INTO outbox_leases (lane) SELECT generate_series(0, 31);

-- Live relays (heartbeat with every lease renewal), so lanes are shared fairly: a relay that holds
-- no lane yet still counts, and the others hand lanes back for it.
CREATE TABLE outbox_relays (
    owner      TEXT        PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Messages that could not be published. parked = the key waits for an operator (policy park).
CREATE TABLE outbox_dead_letters (
    id         UUID        PRIMARY KEY,
    lane       INT         NOT NULL,
    pos        BIGINT      NOT NULL,
    topic      TEXT        NOT NULL,
    key        TEXT,
    seq        BIGINT,
    payload    BYTEA       NOT NULL,
    headers    TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    attempts   INT         NOT NULL,
    error      TEXT        NOT NULL,
    parked     BOOLEAN     NOT NULL,
    dead_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_dead_letters_parked_key ON outbox_dead_letters (key) WHERE parked;

-- Published rows, kept only when the relay is configured to keep them (audit), with where the broker
-- stored them. Cleaned up in small batches.
CREATE TABLE outbox_published (
    id           UUID        PRIMARY KEY,
    topic        TEXT        NOT NULL,
    key          TEXT,
    seq          BIGINT,
    kafka_partition INT      NOT NULL,
    kafka_offset BIGINT      NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_published_published_at ON outbox_published (published_at);
