use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use super::delivery::header_bytes;
use super::*;

#[test]
fn defaults_and_backoff() {
    let c = RabbitConsumerConfig::local("orders");
    assert_eq!(c.prefetch, 32);
    assert_eq!(c.max_attempts, 5);
    assert!(c.declare);
    assert_eq!(c.dead_letter_key(), "orders.dlq");
    let b = c.retry_backoff().unwrap();
    assert_eq!(b.ceiling(1), Duration::from_millis(100));
    assert_eq!(b.ceiling(3), Duration::from_millis(400));
    assert_eq!(b.ceiling(30), Duration::from_secs(5));
    let d = b.delay(3);
    assert!(
        d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
        "{d:?}"
    );
    let c = RabbitConsumerConfig::new("amqp://u:s3cret@h", "q");
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn headers_become_bytes() {
    let mut t = FieldTable::default();
    t.insert("outbox-id".into(), AMQPValue::LongString("abc".into()));
    t.insert("outbox-seq".into(), AMQPValue::LongLongInt(7));
    t.insert("flag".into(), AMQPValue::Boolean(true));
    let h = header_bytes(&BasicProperties::default().with_headers(t));
    assert!(h.contains(&("outbox-id".to_owned(), b"abc".to_vec())));
    assert!(h.contains(&("outbox-seq".to_owned(), b"7".to_vec())));
    assert_eq!(h.len(), 2);
}
