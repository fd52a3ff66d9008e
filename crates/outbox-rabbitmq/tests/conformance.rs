//! The publisher conformance suite (`outbox_tests::publisher_suite`) on RabbitMQ: the shared node
//! for most guarantees, a node of the test's own (SIGKILLed and started again on its data) for
//! kills, and a `TcpProxy` in front of it for cuts. A destination is a durable queue (the
//! publisher's exchange is the default one, so the topic is the queue's name), declared before
//! anything is published to it and read by a background consumer of its own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{declare_queue, name, url, Node, Reader};
use outbox::{FailureKind, Publisher};
use outbox_rabbitmq::{RabbitConfig, RabbitPublisher};
use outbox_tests::proxy::TcpProxy;
use outbox_tests::publisher_suite::{stored, BrokerFixture, Received};

/// Every node `.ci/rabbitmq` starts refuses messages above 4 MiB (`max_message_size`).
const OVERSIZE: usize = 5 * 1024 * 1024;

/// The publisher under test waits this long for confirms and for a connection.
const TIMEOUT: Duration = Duration::from_secs(5);

struct RabbitFixture {
    node: Node,
    /// In front of the node: what the publisher under test connects to (dedicated fixtures only).
    proxy: Option<TcpProxy>,
    readers: outbox_tests::publisher_suite::PerDestination<Arc<Reader>>,
}

impl RabbitFixture {
    fn shared() -> RabbitFixture {
        RabbitFixture {
            node: Node::shared(),
            proxy: None,
            readers: Default::default(),
        }
    }

    async fn dedicated() -> RabbitFixture {
        let node = tokio::task::block_in_place(Node::dedicated);
        let proxy = TcpProxy::start(node.port).await;
        RabbitFixture {
            node,
            proxy: Some(proxy),
            readers: Default::default(),
        }
    }

    fn proxy(&self) -> &TcpProxy {
        self.proxy.as_ref().expect("only a dedicated fixture is cut")
    }
}

#[async_trait]
impl BrokerFixture for RabbitFixture {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    async fn destination(&self) -> String {
        let queue = name("suite");
        declare_queue(&self.node.url(), &queue).await;
        let reader = Arc::new(Reader::start(self.node.url(), queue.clone()));
        self.readers.insert(&queue, reader);
        queue
    }

    async fn missing_destination(&self) -> String {
        // No queue has this name: the default exchange cannot route it.
        name("no-such-queue")
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        let port = self.proxy.as_ref().map_or(self.node.port, |p| p.port);
        let cfg = RabbitConfig::new(url(port))
            .confirm_timeout(TIMEOUT)
            .connect_timeout(TIMEOUT);
        Arc::new(RabbitPublisher::connect(cfg).await.expect("connect the publisher"))
    }

    async fn read(&self, destination: &str, at_least: usize, timeout: Duration) -> Vec<Received> {
        self.readers.get(destination).read(at_least, timeout).await
    }

    fn oversize(&self) -> usize {
        OVERSIZE
    }

    async fn kill(&self) {
        tokio::task::block_in_place(|| self.node.kill());
    }

    async fn start(&self) {
        tokio::task::block_in_place(|| self.node.start());
    }

    async fn cut(&self) {
        self.proxy().cut();
    }

    async fn restore(&self) {
        self.proxy().restore().await;
    }

    fn failure_bound(&self) -> Duration {
        TIMEOUT * 3
    }
}

outbox_tests::publisher_suite!(
    shared = RabbitFixture::shared(),
    dedicated = RabbitFixture::dedicated().await,
);

/// lapin hands a `basic.return` to whichever confirm it completes next (in any order when one ack
/// covers several messages), not necessarily to the returned message's own. Many batches with
/// unroutable messages between routable ones: every outcome must be its own row's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_return_is_reported_for_its_own_message() {
    let fixture = RabbitFixture::shared();
    let dest = fixture.destination().await;
    let missing = fixture.missing_destination().await;
    let publisher = fixture.publisher().await;
    let mut wrong = Vec::new();
    for round in 0..40 {
        let batch: Vec<_> = (0..100)
            .map(|i| {
                let to = if i % 7 == 3 { &missing } else { &dest };
                stored(round * 100 + i, to, None, None, format!("{round}-{i}").into_bytes())
            })
            .collect();
        let out = publisher.publish(&batch).await;
        for (row, r) in batch.iter().zip(&out) {
            match (row.topic == missing, r) {
                (true, Err(e)) if e.kind == FailureKind::Permanent => {}
                (false, Ok(_)) => {}
                (_, other) => wrong.push(format!("row {} to {}: {other:?}", row.pos, row.topic)),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 4,000 outcomes were not their own row's, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
}

/// Header content AMQP cannot carry: a header name or a content type longer than 255 bytes (a
/// short string's length is one byte), headers larger than a frame (lapin sends a message's
/// properties as one frame). Sent, they broke the connection: the row came back unavailable (no
/// attempt counted, so it was retried for ever, its lane held) and the rows beside it failed too.
/// They are refused before sending, as permanent (dead-lettered), and the rows beside them go
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_amqp_cannot_carry_are_refused_as_permanent_and_the_rest_goes_through() {
    let fixture = RabbitFixture::shared();
    let dest = fixture.destination().await;
    let publisher = fixture.publisher().await;
    let unsendable = [
        ("x".repeat(300), "v".to_owned()),
        ("content-type".to_owned(), "t".repeat(300)),
        ("h".to_owned(), "v".repeat(200_000)),
    ];
    for (pos, header) in (0..).step_by(2).zip(unsendable) {
        let what = format!("{} / {} bytes", header.0.len(), header.1.len());
        let batch = vec![
            stored(pos, &dest, None, None, b"bad".to_vec()).headers(vec![header]),
            stored(pos + 1, &dest, None, None, b"good".to_vec()),
        ];
        let out = publisher.publish(&batch).await;
        assert!(
            matches!(&out[0], Err(e) if e.kind == FailureKind::Permanent),
            "{what}: {:?}",
            out[0]
        );
        assert!(out[1].is_ok(), "{what}: {:?}", out[1]);
    }
}

/// A queue that refuses more (`x-max-length` with `x-overflow = reject-publish`: full while its
/// consumers are down) nacks every message sent to it. A nack was retryable: each one counted an
/// attempt, and a queue full for a quarter of an hour had its backlog dead-lettered. It is the
/// broker's state, not the message: unavailable, the relay backs off and counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_a_full_queue_refuses_is_unavailable_not_retryable() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let node = Node::shared();
    let queue = name("full");
    let conn = common::connect(&node.url()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    ch.queue_declare(&queue, QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let cfg = RabbitConfig::new(node.url())
        .confirm_timeout(TIMEOUT)
        .connect_timeout(TIMEOUT);
    let publisher = RabbitPublisher::connect(cfg).await.unwrap();
    let rows: Vec<_> = (1..=2).map(|i| stored(i, &queue, None, None, b"x".to_vec())).collect();
    let out = publisher.publish(&rows).await;
    let _ = ch.queue_delete(&queue, Default::default()).await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    let refused = out[1].as_ref().expect_err("the queue is full");
    assert_eq!(refused.kind, FailureKind::Unavailable, "{refused:?}");
}
