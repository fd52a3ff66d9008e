use super::*;

#[test]
fn secrets_are_redacted() {
    let mut m = BTreeMap::new();
    m.insert("sasl.password".to_string(), "hunter2".to_string());
    m.insert("bootstrap.servers".to_string(), "127.0.0.1:9092".to_string());
    let r = redacted(&m);
    assert_eq!(r["sasl.password"], "***");
    assert_eq!(r["bootstrap.servers"], "127.0.0.1:9092");
}

#[test]
fn classification() {
    let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
    assert_eq!(classify(&big).kind, outbox::FailureKind::Permanent);
    let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
    assert_eq!(classify(&timeout).kind, outbox::FailureKind::Unavailable);
    let down = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
    assert_eq!(classify(&down).kind, outbox::FailureKind::Unavailable);
    let isr = KafkaError::MessageProduction(RDKafkaErrorCode::NotEnoughReplicas);
    assert_eq!(classify(&isr).kind, outbox::FailureKind::Unavailable);
    let other = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidMessage);
    assert_eq!(classify(&other).kind, outbox::FailureKind::Retryable);
    // A fatal producer error fails every message queued (purged) or sent to the old producer
    // before it is rebuilt: the producer's state, not the messages'. Retryable, each charged an
    // attempt on every lane at every fatal error, and a fatal error that comes back (a missing
    // IdempotentWrite ACL) dead-lettered the backlog.
    for code in [
        RDKafkaErrorCode::Fatal,
        RDKafkaErrorCode::PurgeQueue,
        RDKafkaErrorCode::PurgeInflight,
    ] {
        let e = KafkaError::MessageProduction(code);
        assert_eq!(classify(&e).kind, outbox::FailureKind::Unavailable, "{code:?}");
    }
}

#[test]
fn defaults_fill_in_but_never_override() {
    let p = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("partitioner", "consistent")]).unwrap();
    let s = p.settings();
    assert_eq!(s["partitioner"], "consistent");
    assert_eq!(s["acks"], "all");
    assert_eq!(s["enable.idempotence"], "true");
    assert_eq!(s["linger.ms"], "1");
    let p = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("queue.buffering.max.ms", "20")]).unwrap();
    assert_eq!(
        p.settings().get("linger.ms"),
        None,
        "the alias given is kept, not overridden"
    );
    // An unknown topic fails (permanent) before the delivery timeout (unavailable).
    assert_eq!(s["topic.metadata.propagation.max.ms"], "10000");
    let p = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("message.timeout.ms", "6000")]).unwrap();
    assert_eq!(p.settings()["topic.metadata.propagation.max.ms"], "2000");
    let p = KafkaPublisher::new([
        ("bootstrap.servers", "127.0.0.1:1"),
        ("topic.metadata.propagation.max.ms", "500"),
    ])
    .unwrap();
    assert_eq!(p.settings()["topic.metadata.propagation.max.ms"], "500");
    // librdkafka itself rejects a setting that breaks idempotence, with a clear message.
    let err = KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("acks", "1")]).unwrap_err();
    assert!(err.to_string().contains("acks"), "{err}");
    let err = KafkaPublisher::new([("no.such.setting", "1")]).unwrap_err();
    assert!(err.to_string().contains("no.such.setting"), "{err}");
}

#[test]
fn settings_that_break_confirm_before_mark_or_key_order_are_refused() {
    let refused = |extra: &[(&str, &str)], names: &str| {
        let mut settings = vec![("bootstrap.servers", "127.0.0.1:1")];
        settings.extend_from_slice(extra);
        let err = KafkaPublisher::new(settings).expect_err("refused");
        assert!(err.to_string().contains(names), "{extra:?}: {err}");
    };
    refused(&[("acks", "0"), ("enable.idempotence", "false")], "acks");
    refused(&[("acks", "1"), ("enable.idempotence", "false")], "acks");
    refused(
        &[("request.required.acks", "1"), ("enable.idempotence", "false")],
        "request.required.acks",
    );
    refused(
        &[("enable.idempotence", "false")],
        "max.in.flight.requests.per.connection",
    );
    refused(
        &[
            ("enable.idempotence", "false"),
            ("max.in.flight.requests.per.connection", "5"),
        ],
        "max.in.flight.requests.per.connection",
    );
    refused(&[("message.timeout.ms", "0")], "message.timeout.ms");
    // librdkafka takes a topic setting with a `topic.` prefix too, and applies it over the default.
    let no_idempotence = ("max.in.flight.requests.per.connection", "1");
    refused(
        &[("topic.acks", "1"), ("enable.idempotence", "false"), no_idempotence],
        "topic.acks",
    );
    refused(
        &[
            ("acks", "all"),
            ("topic.request.required.acks", "0"),
            ("enable.idempotence", "false"),
            no_idempotence,
        ],
        "topic.request.required.acks",
    );
    refused(&[("topic.message.timeout.ms", "0")], "topic.message.timeout.ms");
    // A partitioner that ignores the key spreads a key over partitions (its `_random` variants only
    // spread messages without a key, which have no order to keep).
    refused(&[("partitioner", "random")], "partitioner");
    refused(&[("topic.partitioner", "random")], "topic.partitioner");
    KafkaPublisher::new([("bootstrap.servers", "127.0.0.1:1"), ("partitioner", "murmur2_random")]).unwrap();
    // What keeps the invariants is accepted.
    KafkaPublisher::new([
        ("bootstrap.servers", "127.0.0.1:1"),
        ("enable.idempotence", "false"),
        ("max.in.flight.requests.per.connection", "1"),
        ("acks", "-1"),
    ])
    .unwrap();
}
