-- The claim's test for a waiting row is `available_at <> created_at AND available_at > now()`, the
-- same for skipping the row and for holding back its key's later rows. The partial index that
-- serves the predecessor check takes exactly the rows that can wait (delayed, backed off), so its
-- predicate follows that condition. Applied by outbox::postgres::migrate(&pool), or copy it.
DROP INDEX IF EXISTS outbox_messages_waiting;
CREATE INDEX outbox_messages_waiting ON outbox_messages (key, seq)
    WHERE key IS NOT NULL AND available_at <> created_at;
