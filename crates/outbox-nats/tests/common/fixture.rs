//! The publisher conformance suite's fixture for NATS.

use std::sync::Arc;
use std::time::Duration;

use outbox_nats::{async_nats, NatsConfig, NatsPublisher};
use outbox_tests::proxy::TcpProxy;
use outbox_tests::publisher_suite::{BrokerFixture, Received};

use super::{client, new_destination, publisher_config, read_stream, shared_url, Server};

/// The publisher conformance suite's view of NATS: a destination is a topic with a stream of its
/// own; the dedicated fixture puts a TCP proxy between the publisher and its own server.
pub struct NatsFixture {
    server: Option<Server>,
    proxy: Option<TcpProxy>,
    url: String,
    reader: async_nats::Client,
    streams: outbox_tests::publisher_suite::PerDestination<String>,
}

impl NatsFixture {
    pub async fn shared() -> NatsFixture {
        let url = shared_url();
        NatsFixture {
            reader: client(&url).await,
            server: None,
            proxy: None,
            url,
            streams: Default::default(),
        }
    }

    pub async fn dedicated() -> NatsFixture {
        let server = Server::start().await;
        let proxy = TcpProxy::start(server.port).await;
        NatsFixture {
            reader: client(&server.url()).await,
            url: format!("nats://127.0.0.1:{}", proxy.port),
            server: Some(server),
            proxy: Some(proxy),
            streams: Default::default(),
        }
    }

    pub fn publisher_config(&self) -> NatsConfig {
        publisher_config(&self.url)
    }
}

#[async_trait::async_trait]
impl BrokerFixture for NatsFixture {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn destination(&self) -> String {
        let (topic, stream) = new_destination(&self.reader, "suite").await;
        self.streams.insert(&topic, stream);
        topic
    }

    async fn missing_destination(&self) -> String {
        format!("no-stream-{}", uuid::Uuid::new_v4().simple())
    }

    async fn publisher(&self) -> Arc<dyn outbox::Publisher> {
        Arc::new(NatsPublisher::connect(self.publisher_config()).await.unwrap())
    }

    async fn read(&self, destination: &str, at_least: usize, timeout: Duration) -> Vec<Received> {
        read_stream(&self.reader, &self.streams.get(destination), at_least, timeout).await
    }

    fn oversize(&self) -> usize {
        // nats-server's default max_payload (1 MiB) plus one byte.
        1024 * 1024 + 1
    }

    async fn kill(&self) {
        self.server.as_ref().expect("dedicated").kill().await;
    }

    async fn start(&self) {
        self.server.as_ref().expect("dedicated").up().await;
    }

    async fn cut(&self) {
        self.proxy.as_ref().expect("dedicated").cut();
    }

    async fn restore(&self) {
        self.proxy.as_ref().expect("dedicated").restore().await;
    }

    fn failure_bound(&self) -> Duration {
        // The ack timeout (5 s) plus slack.
        Duration::from_secs(15)
    }
}
