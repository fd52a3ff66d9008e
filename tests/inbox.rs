//! The inbox on every database it supports: the inbox suite (`outbox_tests::inbox_suite!`, every
//! scenario written once) on PostgreSQL, MySQL/MariaDB and SQLite (a file, so that deliveries run on
//! several connections), a fresh database per test. Every redelivery is recognised, the handler's
//! effect commits once with the dedup record, gaps follow the policy (a skipped message arriving late
//! is processed once), concurrent deliveries run the effect once, cleanup works in batches.
//! Below the suites: the parsing of delivered messages, which needs no database.

use outbox_inbox::{InboxError, Incoming};
use uuid::Uuid;

mod postgres {
    outbox_tests::inbox_suite!(sqlx::Postgres, outbox_tests::db::fresh_pg());
}

mod mysql {
    outbox_tests::inbox_suite!(sqlx::MySql, outbox_tests::db::fresh_mysql());
}

mod sqlite {
    outbox_tests::inbox_suite!(sqlx::Sqlite, outbox_tests::db::fresh_sqlite());
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
