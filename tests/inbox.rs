//! The inbox on every database it supports: the inbox suite (`outbox_tests::inbox_suite!`, every
//! scenario written once) on PostgreSQL, MySQL/MariaDB and SQLite (a file, so that deliveries run on
//! several connections), a fresh database per test. Every redelivery is recognised, the handler's
//! effect commits once with the dedup record, gaps follow the policy (a skipped message arriving late
//! is processed once), concurrent deliveries run the effect once, cleanup works in batches.
//! Below the suites: the parsing of delivered messages, which needs no database.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use outbox_inbox::{Handler, Inbox, InboxError, Incoming, Outcome};
use outbox_tests::embedded::{drained, kafka, start, test_config};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

mod postgres {
    outbox_tests::inbox_suite!(
        sqlx::Postgres,
        outbox_tests::db::fresh_pg(),
        outbox_tests::db::fresh_pg_unmigrated()
    );
}

mod mysql {
    outbox_tests::inbox_suite!(
        sqlx::MySql,
        outbox_tests::db::fresh_mysql(),
        outbox_tests::db::fresh_mysql_unmigrated()
    );
}

mod sqlite {
    outbox_tests::inbox_suite!(
        sqlx::Sqlite,
        outbox_tests::db::fresh_sqlite(),
        outbox_tests::db::fresh_sqlite_unmigrated()
    );
}

#[test]
fn incoming_is_parsed_from_the_framework_headers() {
    let id = Uuid::now_v7().to_string();
    let headers = [
        (
            "traceparent",
            &b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..],
        ),
        ("outbox-id", id.as_bytes()),
        ("outbox-key", b"order-42"),
        ("outbox-seq", b"17"),
        ("content-type", b"application/json"),
    ];
    let msg = Incoming::from_headers("orders", b"{}", headers).unwrap();
    assert_eq!(msg.id.to_string(), id);
    assert_eq!((msg.key, msg.seq), (Some("order-42"), Some(17)));
    assert_eq!((msg.topic, msg.payload), ("orders", &b"{}"[..]));
    assert_eq!(msg.headers.len(), 5);
    assert_eq!(msg.header_value("content-type"), Some(&b"application/json"[..]));

    let unkeyed = Incoming::from_headers("orders", b"", [("outbox-id", id.as_bytes())]).unwrap();
    assert_eq!((unkeyed.key, unkeyed.seq), (None, None));
}

#[test]
fn incoming_without_a_usable_id_is_a_permanent_error() {
    let none: [(&str, &[u8]); 1] = [("outbox-key", b"k")];
    let err = Incoming::from_headers("orders", b"", none).unwrap_err();
    assert!(matches!(err, InboxError::MissingHeader("outbox-id")), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("outbox-id"), "{err}");

    let id = Uuid::now_v7().to_string();
    let bad: [&[(&str, &[u8])]; 6] = [
        &[("outbox-id", b"not-a-uuid")],
        &[("outbox-id", b"")],
        &[("outbox-id", b"\xff\xfe")],
        &[("outbox-id", id.as_bytes()), ("outbox-seq", b"seven")],
        &[("outbox-id", id.as_bytes()), ("outbox-seq", b"0")],
        &[("outbox-id", id.as_bytes()), ("outbox-key", b"")],
    ];
    for headers in bad {
        let err = Incoming::from_headers("orders", b"", headers.iter().copied()).unwrap_err();
        assert!(
            matches!(err, InboxError::MalformedHeader { .. }),
            "{headers:?}: {err:?}"
        );
        assert!(!err.is_retryable());
    }
}

#[test]
fn only_database_trouble_is_infrastructure() {
    #[derive(Debug, thiserror::Error)]
    #[error("handler failed")]
    struct Failed;

    let database = [
        sqlx::Error::PoolTimedOut,
        sqlx::Error::RowNotFound,
        sqlx::Error::Protocol("unexpected answer".into()),
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
    ];
    for e in database {
        let err = InboxError::<Failed>::Database(e);
        assert!(err.is_infrastructure(), "{err:?}");
    }
    let not: [InboxError<Failed>; 3] = [
        InboxError::Handler(Failed),
        InboxError::MissingHeader("outbox-id"),
        InboxError::MalformedHeader {
            name: "outbox-seq",
            reason: "seven".into(),
        },
    ];
    for err in not {
        assert!(!err.is_infrastructure(), "{err:?}");
    }
}

/// Writes one row per applied message.
struct Apply;

#[async_trait]
impl Handler<Postgres> for Apply {
    type Error = sqlx::Error;

    async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO applied (message_id) VALUES ($1)")
            .bind(msg.id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Two services, each with its own outbox database and relay, publish key "order-42" to one
/// topic; one consumer reads it through its inbox: all four messages are applied, once.
#[tokio::test]
async fn the_same_key_from_two_outbox_databases_reaches_one_consumer_in_full() {
    let bootstrap = outbox_tests::kafka::broker();
    let topic = outbox_tests::kafka::topic("inbox-sources");
    outbox_tests::kafka::create_topic(&bootstrap, &topic, 1).await;
    let mut expect = HashSet::new();
    let mut relays = Vec::new();
    for _ in 0..2 {
        let pool = outbox_tests::db::fresh_pg().await;
        let mut tx = pool.begin().await.unwrap();
        for n in 1..=2 {
            let msg = outbox::Message::new(topic.as_str(), format!("{n}")).key("order-42");
            let e = outbox::enqueue(&mut tx, &msg).await.unwrap();
            assert_eq!(e.seq, Some(n));
            expect.insert(e.id);
        }
        tx.commit().await.unwrap();
        let store = outbox::postgres::PgStore::new(pool);
        let relay = start(store.clone(), kafka(&bootstrap, &[]), test_config());
        relays.push((relay, store));
    }
    for (_, store) in &relays {
        drained(store, Duration::from_secs(60)).await;
    }
    for (relay, _) in relays {
        relay.stop().await;
    }
    let seen = outbox_tests::kafka::read_all(&bootstrap, &topic, &expect).await;
    assert_eq!(seen.len(), 4, "{seen:?}");

    let pool = pg_with_applied().await;
    let inbox = Inbox::new("order-consumer");
    for round in 0..2 {
        for s in &seen {
            let headers = s.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
            let msg = Incoming::from_headers(&topic, &s.payload, headers).unwrap();
            let expected = if round == 0 {
                Outcome::Processed
            } else {
                Outcome::Duplicate
            };
            assert_eq!(
                inbox.process(&pool, &msg, &Apply).await.unwrap(),
                expected,
                "round {round}: {:?} seq {:?}",
                s.key,
                s.seq
            );
        }
    }
    let applied: Vec<Uuid> = sqlx::query_scalar("SELECT message_id FROM applied")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(applied.into_iter().collect::<HashSet<_>>(), expect);
}

#[test]
fn the_source_header_is_parsed_and_checked() {
    let id = Uuid::now_v7().to_string();
    let source = Uuid::new_v4().to_string();
    let with = |value: &[u8]| -> Result<Option<String>, InboxError> {
        let headers: [(&str, &[u8]); 2] = [("outbox-id", id.as_bytes()), ("outbox-source", value)];
        Incoming::from_headers("orders", b"", headers).map(|m| m.source.map(str::to_owned))
    };
    assert_eq!(with(source.as_bytes()).unwrap(), Some(source.clone()));
    assert_eq!(
        with(&[b'x'; outbox_inbox::MAX_SOURCE_LEN]).unwrap().map(|s| s.len()),
        Some(255)
    );
    // Empty: the default source, as without the header.
    assert_eq!(with(b"").unwrap(), None);
    let none = Incoming::from_headers("orders", b"", [("outbox-id", id.as_bytes())]).unwrap();
    assert_eq!(none.source, None);
    for bad in [&[b'x'; outbox_inbox::MAX_SOURCE_LEN + 1][..], b"\xff"] {
        let err = with(bad).unwrap_err();
        assert!(
            matches!(
                err,
                InboxError::MalformedHeader {
                    name: "outbox-source",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }
    assert_eq!(Incoming::new(Uuid::now_v7(), "t", b"").source("").source, None);
}

/// MySQL DDL is not transactional: an interrupted run of migration 0003 is repeated from its start.
/// Every statement of it runs again without error and without changing what the first run did.
#[tokio::test]
async fn mysql_migration_0003_can_run_again() {
    let pool = outbox_tests::db::fresh_mysql().await;
    let source: String = outbox_tests::db::scalar(&pool, "SELECT id FROM outbox_source").await;
    let m = outbox::mysql::MIGRATOR.iter().find(|m| m.version == 3).unwrap();
    for _ in 0..2 {
        sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
    }
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox_source")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, [source]);
    let primary: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(column_name AS CHAR) FROM information_schema.key_column_usage \
         WHERE table_schema = DATABASE() AND table_name = 'outbox_inbox_gaps' AND constraint_name = 'PRIMARY' \
         ORDER BY ordinal_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(primary, ["consumer", "source", "key_hash", "from_seq"]);
}

/// A fresh PostgreSQL database with the `applied` table [`Apply`] writes to.
async fn pg_with_applied() -> sqlx::PgPool {
    let pool = outbox_tests::db::fresh_pg().await;
    sqlx::raw_sql("CREATE TABLE applied (message_id UUID PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

/// Writes its effect, then runs a statement that fails and carries on as if nothing happened (an
/// insert whose unique violation it takes for "already there", say). PostgreSQL aborts the
/// transaction at the failed statement: nothing more runs in it, and its COMMIT rolls back.
struct Swallows {
    /// Succeeds instead once this many calls have swallowed their error.
    swallow: std::sync::atomic::AtomicUsize,
    /// Swallows only on this message (`None`: on any).
    only: Option<Uuid>,
}

#[async_trait]
impl Handler<Postgres> for Swallows {
    type Error = sqlx::Error;

    async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
        Apply.handle(tx, msg).await?;
        if self.swallow.load(std::sync::atomic::Ordering::SeqCst) > 0 && self.only.is_none_or(|id| id == msg.id) {
            self.swallow.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = sqlx::query("SELECT 1 / 0").execute(&mut **tx).await;
        }
        Ok(())
    }
}

/// A handler that swallowed a failed statement on PostgreSQL returned `Ok`, the inbox committed,
/// PostgreSQL rolled back (the record and the effect with it) and `process` said `Processed`: the
/// consumer committed the offset of a message never applied. Under `Hold` the parked messages'
/// read after the handler failed instead, taken for database trouble: the runner waited for ever.
/// Now `process` fails with `HandlerAborted` (retryable, not infrastructure: the runner retries the
/// message and dead-letters it if it keeps failing), and a later delivery applies it once.
#[tokio::test]
async fn a_handler_that_swallows_a_failed_statement_on_postgres_is_not_taken_for_processed() {
    let pool = pg_with_applied().await;
    for (inbox, key) in [
        (Inbox::new("c"), None),
        (Inbox::new("h").gap_policy(outbox_inbox::GapPolicy::Hold), Some("k")),
    ] {
        let handler = Swallows {
            swallow: std::sync::atomic::AtomicUsize::new(1),
            only: None,
        };
        let id = Uuid::now_v7();
        let mut msg = Incoming::new(id, "t", b"");
        if let Some(key) = key {
            msg = msg.keyed(key, 1);
        }
        let err = inbox.process(&pool, &msg, &handler).await.unwrap_err();
        assert!(matches!(err, InboxError::HandlerAborted(_)), "{key:?}: {err:?}");
        assert!(err.is_retryable() && !err.is_infrastructure(), "{err:?}");
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied WHERE message_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(applied, 0);
        assert_eq!(inbox.process(&pool, &msg, &handler).await.unwrap(), Outcome::Processed);
        assert_eq!(inbox.process(&pool, &msg, &handler).await.unwrap(), Outcome::Duplicate);
    }
}

/// Under `Hold`, a parked message whose handler swallowed a failed statement failed the inbox's
/// check with `HandlerAborted`, which named no parked message: a runner whose tries ran out
/// dead-lettered the delivered message (applied) and left the parked one holding its key. The
/// error is now `ParkedAborted`, naming the parked message (`InboxError::parked`), and the
/// delivered message stays applied.
#[tokio::test]
async fn under_hold_a_parked_message_that_swallows_a_failed_statement_is_named_by_the_error() {
    let pool = pg_with_applied().await;
    let inbox = Inbox::new("h").gap_policy(outbox_inbox::GapPolicy::Hold);
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    let handler = Swallows {
        swallow: std::sync::atomic::AtomicUsize::new(1),
        only: Some(second),
    };
    let m2 = Incoming::new(second, "t", b"").keyed("k", 2);
    assert_eq!(inbox.process(&pool, &m2, &handler).await.unwrap(), Outcome::Parked);
    let m1 = Incoming::new(first, "t", b"").keyed("k", 1);
    let err = inbox.process(&pool, &m1, &handler).await.unwrap_err();
    assert!(matches!(err, InboxError::ParkedAborted { seq: 2, .. }), "{err:?}");
    assert_eq!(err.parked(), Some((second, 2)));
    assert!(err.is_retryable() && !err.is_infrastructure(), "{err:?}");
    let applied: Vec<Uuid> = sqlx::query_scalar("SELECT message_id FROM applied")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(applied, [first], "the delivered message applied, the parked one not");
    // Delivered again (a duplicate now), it tries the parked message again, which applies now.
    assert_eq!(inbox.process(&pool, &m1, &handler).await.unwrap(), Outcome::Duplicate);
    let applied: Vec<Uuid> = sqlx::query_scalar("SELECT message_id FROM applied ORDER BY message_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        applied,
        [first, second],
        "the parked message applied with the duplicate"
    );
}

/// Runs one statement in the handler's transaction and returns `Ok`.
struct RunsSql(&'static str);

#[async_trait]
impl<DB: outbox_inbox::Backend> Handler<DB> for RunsSql
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    type Error = sqlx::Error;

    async fn handle(&self, tx: &mut Transaction<'_, DB>, _: &Incoming<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(self.0).execute(&mut **tx).await?;
        Ok(())
    }
}

/// A handler whose write breaks a constraint checked only at commit (a deferred foreign key): the
/// COMMIT failed, and the inbox took that for database trouble, so a runner waited for the
/// database for ever and never dead-lettered the message, which fails the same way every time.
/// It is the handler's (`HandlerAborted`: retried, then dead-lettered), on PostgreSQL and SQLite.
#[tokio::test]
async fn a_handler_write_refused_at_commit_by_a_deferred_constraint_is_the_handlers_failure() {
    async fn check<DB: outbox_inbox::Backend>(pool: &sqlx::Pool<DB>, schema: &'static str)
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    {
        sqlx::raw_sql(schema).execute(pool).await.unwrap();
        let orphan = RunsSql("INSERT INTO child (parent) VALUES (42)");
        let msg = Incoming::new(Uuid::now_v7(), "t", b"");
        let err = Inbox::new("c").process(pool, &msg, &orphan).await.unwrap_err();
        assert!(matches!(err, InboxError::HandlerAborted(_)), "{err:?}");
        assert!(err.is_retryable() && !err.is_infrastructure(), "{err:?}");
    }
    check(
        &outbox_tests::db::fresh_pg().await,
        "CREATE TABLE parent (id INT PRIMARY KEY); \
         CREATE TABLE child (parent INT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .await;
    check(
        &outbox_tests::db::fresh_sqlite().await,
        "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
         CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .await;
}
