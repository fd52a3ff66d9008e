//! Credentials in the URL: they reach a server that requires them, and no log line, `Debug` output
//! or outcome ever shows the password. Its own test binary: it captures every log line of the
//! process.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use outbox::{FailureKind, Publisher};
use outbox_nats::{NatsConfig, NatsPublisher};

const PASSWORD: &str = "s3cret-pa55";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_password_in_the_url_reaches_the_server_and_no_log_line() {
    let logs = Captured::default();
    let writer = logs.clone();
    // Everything at trace, but async-nats's protocol trace: it prints the CONNECT line, password
    // included (see README, "Publisher").
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace,async_nats::connection=debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = Server::start_with_auth("relay", PASSWORD).await;
    let url = format!("nats://relay:{PASSWORD}@127.0.0.1:{}", server.port);
    // The reader gets the credentials as options (async-nats ignores a URL's user info).
    let reader = outbox_nats::async_nats::ConnectOptions::with_user_and_password("relay".into(), PASSWORD.into())
        .connect(server.url())
        .await
        .unwrap();
    let (topic, stream) = new_destination(&reader, "creds").await;
    let cfg = NatsConfig::default()
        .url(url.clone())
        .ack_timeout(Duration::from_secs(5));
    let p = NatsPublisher::connect(cfg.clone()).await.unwrap();
    let row = outbox_tests::publisher_suite::stored(1, &topic, Some("k"), Some(1), b"x".to_vec());
    p.publish(std::slice::from_ref(&row))
        .await
        .remove(0)
        .expect("published with the URL's credentials");
    assert_eq!(
        read_stream(&reader, &stream, 1, Duration::from_secs(10)).await[0].id,
        row.id
    );

    // A wrong password: the server is unavailable to this publisher, nothing is dead-lettered.
    let wrong = NatsConfig::default()
        .url(format!("nats://relay:wrong-{PASSWORD}@127.0.0.1:{}", server.port))
        .connect_timeout(Duration::from_secs(1));
    let denied = NatsPublisher::connect(wrong).await.unwrap();
    let out = denied.publish(std::slice::from_ref(&row)).await.remove(0).unwrap_err();
    assert_eq!(out.kind, FailureKind::Unavailable, "{out:?}");

    let shown = format!("{cfg:?} {p:?} {denied:?} {out:?} {}", outbox::redact::redact_url(&url));
    assert!(!shown.contains(PASSWORD), "{shown}");
    drop((p, denied));
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logs.contains("connected"), "logs were captured:\n{logs}");
    assert!(!logs.contains(PASSWORD), "a log line shows the password:\n{logs}");
}
