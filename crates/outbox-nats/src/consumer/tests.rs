use super::*;

#[test]
fn defaults_are_the_documented_ones_and_files_refuse_unknown_keys() {
    let cfg: NatsConsumerConfig = toml::from_str("stream = 'ORDERS'\ndurable = 'billing'").unwrap();
    assert_eq!((cfg.stream.as_str(), cfg.durable.as_str()), ("ORDERS", "billing"));
    assert_eq!(cfg.url, "nats://127.0.0.1:4222");
    assert_eq!(cfg.max_deliver, 5);
    assert_eq!(cfg.ack_wait, Duration::from_secs(30));
    assert_eq!(cfg.max_ack_pending, 1);
    assert_eq!(
        (cfg.backoff_base, cfg.backoff_max),
        (Duration::from_millis(100), Duration::from_secs(5))
    );
    assert_eq!(cfg.dead_letter_prefix, "dlq");
    assert!(cfg.create_dead_letter_stream);
    assert_eq!(cfg.cleanup_interval, Some(Duration::from_secs(600)));
    let never: NatsConsumerConfig = toml::from_str("cleanup_interval_ms = 0\nack_wait_ms = 1500").unwrap();
    assert_eq!(
        (never.cleanup_interval, never.ack_wait),
        (None, Duration::from_millis(1500))
    );
    let err = toml::from_str::<NatsConsumerConfig>("max_delivery = 3").err().unwrap();
    assert!(err.to_string().contains("max_delivery"), "{err}");
    let shown = format!("{:?}", cfg.url("nats://u:hunter2@h"));
    assert!(!shown.contains("hunter2"), "{shown}");
}
