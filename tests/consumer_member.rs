//! One member of a consumer group, as its own process, for tests that SIGKILL members: a
//! `ConsumerRunner` applying each message through the inbox into `effects`
//! (`outbox_tests::effects`: a second application of a message would show as a second row).
//!
//! ```sh
//! consumer-member BOOTSTRAP TOPIC GROUP DATABASE_URL
//! ```
//!
//! Runs until SIGTERM (finishes the message in hand, commits stored offsets, exits 0) or SIGKILL.

use outbox_inbox::Inbox;
use outbox_kafka::{ConsumerConfig, ConsumerRunner};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, group, url] = args.as_slice() else {
        eprintln!("usage: consumer-member BOOTSTRAP TOPIC GROUP DATABASE_URL");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let pool = sqlx::PgPool::connect(url).await.expect("database");
    let settings = [
        ("bootstrap.servers", bootstrap.as_str()),
        ("group.id", group.as_str()),
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ];
    let runner = ConsumerRunner::new(
        settings,
        &[topic.as_str()],
        pool,
        Inbox::new("effects"),
        outbox_tests::effects::EffectRows,
    )
    .expect("consumer")
    .config(ConsumerConfig::default());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    eprintln!("member ready");
    runner
        .run_until(async move {
            term.recv().await;
        })
        .await
        .expect("runner");
}
