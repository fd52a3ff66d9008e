//! Settings: file, environment and flags; brokers; databases; defaults README states.
use super::databases::databases;
use super::*;

#[test]
fn exactly_one_broker() {
    let none = Overrides::default();
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert!(broker(&none, None, None, None, env(&[]).into_iter()).unwrap().is_none());
    let nats: FileConfig = toml::from_str("[nats]\nurl = \"nats://127.0.0.1:4333\"").unwrap();
    match broker(&none, nats.kafka, nats.rabbitmq, nats.nats, env(&[]).into_iter()).unwrap() {
        Some(Broker::Nats(c)) => assert_eq!(c.url, "nats://127.0.0.1:4333"),
        other => panic!("{other:?}"),
    }
    let both: FileConfig = toml::from_str("[nats]\n[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9092\"").unwrap();
    let err = broker(&none, both.kafka, both.rabbitmq, both.nats, env(&[]).into_iter()).unwrap_err();
    assert!(err.to_string().contains("kafka, nats"), "{err}");
    // A Kafka flag beside a [rabbitmq] section is two brokers too.
    let flags = Overrides {
        kafka: vec!["bootstrap.servers=127.0.0.1:9092".into()],
        ..Overrides::default()
    };
    let err = broker(
        &flags,
        None,
        None,
        None,
        env(&[("OUTBOX_RABBITMQ_URL", "amqp://h")]).into_iter(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("kafka, rabbitmq"), "{err}");
    let bad: Result<FileConfig, _> = toml::from_str("[rabbitmq]\nexchnage = \"x\"");
    assert!(bad.is_err(), "a typo in [rabbitmq] is an error");
}

/// A NATS timeout of 0 was taken as 1 ms: against any server further than that, every publish
/// answered `Unavailable` and the backlog waited for ever. Refused at start, like RabbitMQ's.
#[test]
fn broker_timeouts_of_zero_are_refused() {
    for text in [
        "[nats]\nack_timeout_ms = 0",
        "[nats]\nconnect_timeout_ms = 0",
        "[rabbitmq]\nconfirm_timeout_ms = 0",
        "[rabbitmq]\nconnect_timeout_ms = 0",
    ] {
        let file: FileConfig = toml::from_str(text).unwrap();
        let key = text.split('\n').nth(1).unwrap().split(' ').next().unwrap();
        let err = broker(
            &Overrides::default(),
            file.kafka,
            file.rabbitmq,
            file.nats,
            std::iter::empty(),
        )
        .expect_err(text)
        .to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

/// `OUTBOX_ADMIN_TOKEN` over the file's `[admin] token`; set but empty, it is not there.
#[test]
fn an_empty_admin_token_variable_leaves_the_file_token() {
    let file = || AdminSection {
        token: Some("t".into()),
        ..AdminSection::default()
    };
    let token = |env: Option<&str>| {
        AdminSection::default()
            .with_env_token(env.map(str::to_owned))
            .over(file())
            .token
    };
    assert_eq!(token(Some("")), Some("t".into()));
    assert_eq!(token(None), Some("t".into()));
    assert_eq!(token(Some("u")), Some("u".into()));
}

/// The default column of README's configuration row for `[section] key` (a row may name more keys
/// after the first).
fn readme_default(readme: &str, section: &str, key: &str) -> String {
    let row = readme
        .lines()
        .find(|l| l.starts_with(&format!("| `[{section}] {key}")))
        .unwrap_or_else(|| panic!("README has no row for [{section}] {key}"));
    row.split('|').nth(3).expect("a default column").trim().to_owned()
}

/// README's configuration table states each engine default; this pins it to the constants.
#[test]
fn readme_states_the_engine_defaults() {
    let readme = include_str!("../../../../README.md");
    let default_of = |key: &str| readme_default(readme, "relay", key);
    let ms = |d: Duration| d.as_millis().to_string();
    type C = RelayConfig;
    assert_eq!(default_of("batch_size"), C::DEFAULT_BATCH_SIZE.to_string());
    assert_eq!(default_of("pipeline"), C::DEFAULT_PIPELINE.to_string());
    assert_eq!(default_of("poll_interval_ms"), ms(C::DEFAULT_POLL_INTERVAL));
    assert_eq!(default_of("lease_ttl_ms"), ms(C::DEFAULT_LEASE_TTL));
    assert_eq!(
        default_of("linger_ms"),
        format!("{}, {}", ms(C::DEFAULT_LINGER), ms(C::DEFAULT_LINGER_POLL_INTERVAL))
    );
    assert_eq!(
        default_of("linger_above_writes"),
        C::DEFAULT_LINGER_ABOVE_WRITES.to_string()
    );
    assert_eq!(default_of("adaptive_pace"), C::DEFAULT_ADAPTIVE_PACE.to_string());
    assert!(default_of("pace_max_lag_ms").starts_with(&ms(C::DEFAULT_PACE_MAX_LAG)));
    assert_eq!(default_of("pace_slowdown"), C::DEFAULT_PACE_SLOWDOWN.to_string());
    assert_eq!(default_of("max_attempts"), C::DEFAULT_MAX_ATTEMPTS.to_string());
    assert_eq!(
        default_of("backoff_base_ms"),
        format!("{}, {}", ms(C::DEFAULT_BACKOFF_BASE), ms(C::DEFAULT_BACKOFF_MAX))
    );
    assert_eq!(
        default_of("dead_letter_policy"),
        format!("`{}`", name(C::DEFAULT_DEAD_LETTER_POLICY))
    );
    assert_eq!(default_of("shutdown_grace_ms"), ms(C::DEFAULT_SHUTDOWN_GRACE));
    assert_eq!(default_of("claim_ahead"), format!("`{}`", name(C::DEFAULT_CLAIM_AHEAD)));
    let cleanup = default_of("cleanup_interval_ms");
    assert!(
        cleanup.starts_with(&format!(
            "{} (5 min), {} (7 days)",
            ms(C::DEFAULT_CLEANUP_INTERVAL),
            ms(C::DEFAULT_PUBLISHED_RETENTION)
        )),
        "{cleanup}"
    );
    // The daemon's own defaults.
    let admin_row = |key: &str| readme_default(readme, "admin", key);
    assert_eq!(admin_row("listen"), DEFAULT_ADMIN_LISTEN);
    assert_eq!(admin_row("broker_unavailable_ms"), ms(DEFAULT_BROKER_UNAVAILABLE));
    assert_eq!(default_of("keep_published"), DEFAULT_KEEP_PUBLISHED.to_string());
    // Nothing configured: the engine's defaults, and the daemon's.
    let resolved = RelaySection::default().engine().unwrap();
    assert_eq!(resolved.poll_interval, C::DEFAULT_POLL_INTERVAL);
    assert_eq!(resolved.linger_poll_interval, C::DEFAULT_LINGER_POLL_INTERVAL);
    assert_eq!(resolved.linger_poll_max, C::DEFAULT_LINGER_POLL_MAX);
    assert_eq!(resolved.linger_above_writes, C::DEFAULT_LINGER_ABOVE_WRITES);
    assert_eq!(resolved.shutdown_grace, C::DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(resolved.cleanup_interval, C::DEFAULT_CLEANUP_INTERVAL);
    let built = RelayConfig::default();
    assert_eq!(built.batch_size, C::DEFAULT_BATCH_SIZE);
    assert_eq!(resolved.pipeline, C::DEFAULT_PIPELINE);
    assert_eq!(resolved.pace_max_lag, C::DEFAULT_PACE_MAX_LAG);
    assert_eq!(built.lease_ttl, C::DEFAULT_LEASE_TTL);
    assert_eq!(built.claim_ahead, C::DEFAULT_CLAIM_AHEAD);
    assert_eq!(built.published_retention, C::DEFAULT_PUBLISHED_RETENTION);
}

/// The name the configuration file uses for an enum value (its serde name).
fn name<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}").to_lowercase()
}

#[test]
fn schema_must_be_a_plain_identifier() {
    let pg = "postgres://localhost/app";
    for ok in ["outbox", "_private", "orders_outbox_2"] {
        check_schema(ok, pg).unwrap();
    }
    let long = "a".repeat(64);
    for bad in [
        "",
        "Outbox",
        "2outbox",
        "out-box",
        "a;drop table x",
        "\"q\"",
        "schéma",
        long.as_str(),
    ] {
        let err = check_schema(bad, pg).unwrap_err().to_string();
        assert!(err.contains("plain identifier"), "{bad:?}: {err}");
    }
    assert!(check_schema("outbox", "mysql://localhost/app").is_err());
}

#[test]
fn unknown_keys_are_errors() {
    let err = toml::from_str::<FileConfig>("databse_url = 'x'").unwrap_err();
    assert!(err.to_string().contains("databse_url"));
    let err = toml::from_str::<FileConfig>("[relay]\nbatchsize = 1").unwrap_err();
    assert!(err.to_string().contains("batchsize"));
}

#[test]
fn flags_win_over_file() {
    let dir = std::env::temp_dir().join(format!("relay-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::write(
        &dir,
        "database_url = 'postgres://file'\n[relay]\nbatch_size = 10\npoll_interval_ms = 1000\nlease_ttl_ms = 4000\n\
         [admin]\nlisten = '127.0.0.1:1'\nbroker_unavailable_ms = 1500\n[kafka]\n'bootstrap.servers' = 'a:1'\n",
    )
    .unwrap();
    let o = Overrides {
        config: Some(dir.clone()),
        relay: RelaySection {
            batch_size: Some(20),
            poll_interval_ms: Some(Millis(Duration::from_millis(250))),
            ..Default::default()
        },
        kafka: vec!["bootstrap.servers=b:2".into(), "linger.ms=1".into()],
        ..Default::default()
    };
    let s = resolve(&o).unwrap();
    assert_eq!(s.one_database().unwrap().url, "postgres://file");
    assert_eq!(s.relay.batch_size, 20);
    assert_eq!(s.relay.poll_interval, Duration::from_millis(250));
    assert_eq!(s.relay.lease_ttl, Duration::from_millis(4000), "the file's, no flag");
    assert_eq!(s.broker_unavailable, Duration::from_millis(1500));
    assert_eq!(s.admin_listen, "127.0.0.1:1", "the file's, no flag");
    let Some(Broker::Kafka(kafka)) = &s.broker else {
        panic!("kafka expected: {:?}", s.broker)
    };
    assert_eq!(kafka["bootstrap.servers"], "b:2");
    assert_eq!(kafka["linger.ms"], "1");
    std::fs::remove_file(dir).ok();
}

/// Every `*_ms` key of the daemon's sections is a `Millis`: a bad value is an error naming the key.
#[test]
fn durations_are_whole_milliseconds() {
    for key in [
        "[relay]\npoll_interval_ms",
        "[relay]\nlease_ttl_ms",
        "[relay]\nlinger_ms",
        "[relay]\nlinger_poll_interval_ms",
        "[relay]\nlinger_poll_max_ms",
        "[relay]\npace_max_lag_ms",
        "[relay]\nbackoff_base_ms",
        "[relay]\nbackoff_max_ms",
        "[relay]\nshutdown_grace_ms",
        "[relay]\ncleanup_interval_ms",
        "[relay]\npublished_retention_ms",
        "[admin]\nbroker_unavailable_ms",
        "[rabbitmq]\nconfirm_timeout_ms",
        "[rabbitmq]\nconnect_timeout_ms",
        "[nats]\nack_timeout_ms",
        "[nats]\nconnect_timeout_ms",
    ] {
        let name = key.split('\n').nth(1).unwrap();
        toml::from_str::<FileConfig>(&format!("{key} = 1000")).unwrap();
        for bad in ["-1", "'1s'", "2.5"] {
            let err = toml::from_str::<FileConfig>(&format!("{key} = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{key} = {bad}: {err}");
            assert!(err.contains("whole number of milliseconds"), "{key} = {bad}: {err}");
        }
    }
    let file: FileConfig = toml::from_str("[relay]\nlinger_ms = 0\nbackoff_max_ms = 90000").unwrap();
    let relay = file.relay.engine().unwrap();
    assert_eq!(relay.linger, Duration::ZERO);
    assert_eq!(relay.backoff_max, Duration::from_secs(90));
}

/// The flags and environment variables go through the same type (clap's value parser).
#[test]
fn duration_flags() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: Overrides,
    }
    let cli = Cli::try_parse_from(["outbox-relay", "--poll-interval-ms", "250", "--lease-ttl-ms=5000"]).unwrap();
    assert_eq!(cli.o.relay.poll_interval_ms, Some(Millis(Duration::from_millis(250))));
    assert_eq!(cli.o.relay.lease_ttl_ms, Some(Millis(Duration::from_secs(5))));
    for bad in ["--poll-interval-ms=-5", "--poll-interval-ms=1s", "--lease-ttl-ms=1.5"] {
        let err = Cli::try_parse_from(["outbox-relay", bad]).err().expect(bad).to_string();
        let flag = bad.split('=').next().unwrap();
        assert!(err.contains(flag), "{bad}: {err}");
        assert!(err.contains("whole number of milliseconds"), "{bad}: {err}");
    }
}

/// `--database NAME` beside a single database URL (the flag's, `OUTBOX_DATABASE_URL` or the file's
/// `database_url`) was ignored: the command acted on, or `verify` judged, that URL's database.
#[test]
fn a_database_name_beside_a_single_url_is_refused() {
    let two = "[[database]]\nname = 'a'\nurl = 'postgres://h/a'\n[[database]]\nname = 'b'\nurl = 'postgres://h/b'\n";
    let list = toml::from_str::<FileConfig>(two).unwrap().database;
    let flag = Overrides {
        database_url: Some("postgres://h/flag".into()),
        database: Some("b".into()),
        ..Overrides::default()
    };
    let err = databases(&flag, None, None, list).unwrap_err().to_string();
    assert!(err.contains("--database \"b\""), "{err}");
    let named = Overrides {
        database: Some("b".into()),
        ..Overrides::default()
    };
    let err = databases(&named, Some("postgres://h/file".into()), None, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--database \"b\""), "{err}");
}

#[test]
fn many_databases() {
    let file: FileConfig = toml::from_str(
        "[[database]]\nname = 'orders'\nurl = 'postgres://h/orders'\nschema = 'outbox'\n\
         [[database]]\nname = 'billing'\nurl = 'mysql://h/billing'\n",
    )
    .unwrap();
    let none = Overrides::default();
    let dbs = databases(&none, None, None, file.database).unwrap();
    assert_eq!(
        dbs.iter().map(|d| (d.label(), d.schema.as_deref())).collect::<Vec<_>>(),
        [("orders", Some("outbox")), ("billing", None)]
    );
    let list = |text: &str| toml::from_str::<FileConfig>(text).unwrap().database;
    let two = "[[database]]\nname = 'a'\nurl = 'postgres://h/a'\n[[database]]\nname = 'b'\nurl = 'postgres://h/b'\n";
    let pick = Overrides {
        database: Some("b".into()),
        ..Overrides::default()
    };
    let picked = databases(&pick, None, None, list(two)).unwrap();
    assert_eq!(picked.len(), 1);
    assert_eq!(picked[0].url, "postgres://h/b");
    let wrong = Overrides {
        database: Some("c".into()),
        ..Overrides::default()
    };
    let err = databases(&wrong, None, None, list(two)).unwrap_err().to_string();
    assert!(err.contains("configured: a, b"), "{err}");
    let err = databases(&none, Some("postgres://h/x".into()), None, list(two)).unwrap_err();
    assert!(err.to_string().contains("both set"), "{err}");
    let dup = "[[database]]\nname = 'a'\nurl = 'postgres://h/a'\n[[database]]\nname = 'a'\nurl = 'postgres://h/b'\n";
    assert!(databases(&none, None, None, list(dup))
        .unwrap_err()
        .to_string()
        .contains("twice"));
    let bad = "[[database]]\nname = 'a b'\nurl = 'postgres://h/a'\n";
    assert!(databases(&none, None, None, list(bad))
        .unwrap_err()
        .to_string()
        .contains("invalid"));
    let schema_on_mysql = "[[database]]\nname = 'a'\nurl = 'mysql://h/a'\nschema = 'x'\n";
    assert!(databases(&none, None, None, list(schema_on_mysql)).is_err());
    // A URL flag names one database and replaces the file's list.
    let flag = Overrides {
        database_url: Some("postgres://flag".into()),
        ..Overrides::default()
    };
    let one = databases(&flag, None, None, list(two)).unwrap();
    assert_eq!((one.len(), one[0].name.as_deref()), (1, None));
    let s = Settings {
        databases: databases(&none, None, None, list(two)).unwrap(),
        relay: RelayConfig::default(),
        broker: None,
        admin_listen: String::new(),
        broker_unavailable: DEFAULT_BROKER_UNAVAILABLE,
        admin_token: Some(Secret("t0ken".into())),
        keep_published: false,
    };
    assert!(s.one_database().unwrap_err().to_string().contains("--database NAME"));
    assert!(!format!("{s:?}").contains("t0ken"), "the token is never printed");
}
