use super::*;

#[test]
fn topics_follow_kafka_rules() {
    assert!(validate_topic("order.placed.v1").is_ok());
    assert!(validate_topic(&"a".repeat(249)).is_ok());
    assert!(matches!(validate_topic(""), Err(Error::InvalidTopic { .. })));
    assert!(validate_topic(&"a".repeat(250)).is_err());
    assert!(validate_topic("orders placed").is_err());
    assert!(validate_topic("orders/placed").is_err());
    assert!(validate_topic("..").is_err());
}

#[test]
fn validation_rejects_bad_input() {
    assert!(matches!(
        Message::new("t", vec![0u8; 11]).validate(10, usize::MAX),
        Err(Error::PayloadTooLarge { size: 11, max: 10 })
    ));
    assert!(matches!(
        Message::new("t", "x").header("Outbox-Id", "1").validate(10, usize::MAX),
        Err(Error::ReservedHeader(_))
    ));
    assert!(matches!(
        Message::new("t", "x").key("").validate(10, usize::MAX),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        Message::new("t", "x").key("abcd").validate(10, 3),
        Err(Error::KeyTooLong { size: 4, max: 3 })
    ));
    assert!(Message::new("t", "x").key("abc").validate(10, 3).is_ok());
    assert!(Message::new("t", "x")
        .key("k")
        .header("a", "b")
        .validate(10, usize::MAX)
        .is_ok());
}

#[test]
fn lanes_are_stable_and_in_range() {
    let id = Uuid::now_v7();
    assert_eq!(
        lane_of(Some("order-42"), id, 32),
        lane_of(Some("order-42"), Uuid::now_v7(), 32)
    );
    // Pinned: rows already written carry their lane, so the function must never change.
    assert_eq!(
        lane_of(Some("order-42"), id, 32),
        (crc32fast::hash(b"order-42") % 32) as i32
    );
    for i in 0..1000 {
        let l = lane_of(Some(&format!("k{i}")), id, 32);
        assert!((0..32).contains(&l));
    }
}
