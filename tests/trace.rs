//! Trace context crosses the outbox: the span that enqueued a message is the parent of the
//! consumer's handler span (W3C `traceparent`, feature `opentelemetry`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider};
use outbox::{Message, StoreAdmin};
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_kafka::{ConsumerRunner, KafkaPublisher};
use outbox_relay::{Relay, RelayConfig};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct RecordTrace(Arc<Mutex<Vec<TraceId>>>);

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

#[async_trait]
impl Handler<sqlx::Postgres> for RecordTrace {
    type Error = Never;
    async fn handle(&self, _tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, _msg: &Incoming<'_>) -> Result<(), Never> {
        let cx = tracing::Span::current().context();
        self.0.lock().unwrap().push(cx.span().span_context().trace_id());
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_consumer_span_continues_the_producer_trace() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let bootstrap = outbox_tests::kafka::broker();
    let t = outbox_tests::kafka::topic("trace");
    outbox_tests::kafka::create_topic(&bootstrap, &t, 1).await;
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;

    // The service's request span enqueues the message.
    let request = tracing::info_span!("place_order");
    let producer_trace = request.context().span().span_context().trace_id();
    assert_ne!(producer_trace, TraceId::INVALID);
    async {
        outbox_tests::db::commit_each(&pool, [Message::new(t.clone(), "x").key("k")]).await;
    }
    .instrument(request)
    .await;

    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())]).unwrap();
    let (stop_relay, rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        Relay::new(store.clone(), publisher)
            .config(RelayConfig::default())
            .run_until(async {
                let _ = rx.await;
            }),
    );
    let handler = RecordTrace::default();
    let group = outbox_tests::kafka::topic("g");
    let runner = ConsumerRunner::new(
        [("bootstrap.servers", bootstrap.as_str()), ("group.id", group.as_str())],
        &[t.as_str()],
        pool.clone(),
        Inbox::new("trace"),
        handler.clone(),
    )
    .unwrap();
    let stats = runner.stats();
    let (stop_consumer, crx) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(runner.run_until(async {
        let _ = crx.await;
    }));
    outbox_tests::wait::wait_for("the message consumed", Duration::from_secs(60), || async {
        stats.processed.load(std::sync::atomic::Ordering::Relaxed) >= 1
    })
    .await;
    stop_relay.send(()).unwrap();
    stop_consumer.send(()).unwrap();
    relay.await.unwrap().unwrap();
    consumer.await.unwrap().unwrap();
    assert_eq!(store.status().await.unwrap().pending, 0);
    assert_eq!(
        *handler.0.lock().unwrap(),
        vec![producer_trace],
        "the handler ran in the producer's trace"
    );
}
