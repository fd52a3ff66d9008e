use super::*;

#[test]
fn defaults_are_the_documented_ones_and_files_refuse_unknown_keys() {
    let cfg: NatsConsumerConfig = toml::from_str("stream = 'ORDERS'\ndurable = 'billing'").unwrap();
    assert_eq!((cfg.stream.as_str(), cfg.durable.as_str()), ("ORDERS", "billing"));
    assert_eq!(cfg.url, "nats://127.0.0.1:4222");
    assert_eq!(cfg.max_deliver, 5);
    assert_eq!(cfg.ack_wait_ms, 30_000);
    assert_eq!(cfg.max_ack_pending, 1);
    assert_eq!((cfg.backoff_base_ms, cfg.backoff_max_ms), (100, 5_000));
    assert_eq!(cfg.dead_letter_prefix, "dlq");
    assert!(cfg.create_dead_letter_stream);
    assert_eq!(cfg.cleanup_interval_ms, 600_000);
    let err = toml::from_str::<NatsConsumerConfig>("max_delivery = 3").err().unwrap();
    assert!(err.to_string().contains("max_delivery"), "{err}");
    let shown = format!("{:?}", cfg.url("nats://u:hunter2@h"));
    assert!(!shown.contains("hunter2"), "{shown}");
}
