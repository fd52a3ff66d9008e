//! Embedded relays (and other background loops) for the end-to-end tests: one way to start them,
//! stop them and wait for the backlog to drain.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use outbox::{Delivered, PublishError, Publisher, Store, StoredMessage};
use outbox_kafka::KafkaPublisher;
use outbox_relay::{Relay, RelayConfig};
use tokio::sync::oneshot;

pub use crate::wait::wait_for;

/// Relay settings for tests: quick polls, short leases, short backoff.
pub fn test_config() -> RelayConfig {
    RelayConfig::default()
        .poll_interval(Duration::from_millis(100))
        .lease_ttl(Duration::from_secs(5))
        .backoff_base(Duration::from_millis(50))
        .backoff_max(Duration::from_secs(1))
}

/// A background task that runs until told to stop (or until this is dropped).
pub struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Spawns `run(stopped)`, where `stopped` completes when [`Running::stop`] is called.
    pub fn spawn<F, Fut>(run: F) -> Running
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = oneshot::channel::<()>();
        Running {
            stop,
            task: tokio::spawn(run(rx)),
        }
    }

    /// Asks the task to stop and waits for it; panics if it failed.
    pub async fn stop(self) {
        self.stop.send(()).ok();
        self.task.await.unwrap();
    }
}

/// Starts an embedded relay.
pub fn start<S: Store, P: Publisher>(store: S, publisher: P, cfg: RelayConfig) -> Running {
    start_relay(Relay::new(store, publisher).config(cfg))
}

/// Starts `relay`, built by the caller.
pub fn start_relay<S: Store, P: Publisher>(relay: Relay<S, P>) -> Running {
    run_until_stopped(|stop| relay.run_until(stop))
}

/// Spawns a loop (a relay, a consumer runner): `run_until` is its `run_until`, given a future that
/// completes when the returned [`Running`] is stopped. Stopping panics if the loop failed.
pub fn run_until_stopped<Fut, E>(run_until: impl FnOnce(BoxFuture<'static, ()>) -> Fut) -> Running
where
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug,
{
    Running::spawn(|stopped| {
        let run = run_until(Box::pin(async {
            let _ = stopped.await;
        }));
        async move {
            run.await.unwrap();
        }
    })
}

/// A Kafka publisher for `bootstrap` with extra librdkafka settings.
pub fn kafka(bootstrap: &str, extra: &[(&str, &str)]) -> KafkaPublisher {
    let mut settings = vec![("bootstrap.servers", bootstrap)];
    settings.extend_from_slice(extra);
    KafkaPublisher::new(settings).unwrap()
}

/// Waits until nothing is pending, failing the test after `within`.
pub async fn drained(store: &dyn Store, within: Duration) {
    crate::wait::until("backlog drained", within, || async {
        match store.status().await.unwrap().pending {
            0 => Ok(()),
            p => Err(format!("{p} pending")),
        }
    })
    .await
}

/// Waits until a relay holds every lane of the PostgreSQL outbox at `pool` and every lane has
/// claimed once and found nothing (its flag says idle: it waits for a wake-up).
pub async fn every_lane_idle(pool: &sqlx::PgPool) {
    wait_for("every lane held and idle", Duration::from_secs(15), || async {
        let idle: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_leases WHERE owner IS NOT NULL AND idle")
            .fetch_one(pool)
            .await
            .unwrap();
        idle == i64::from(outbox::LANES)
    })
    .await;
}

/// Counts publishes in progress and remembers the most at once.
#[derive(Default)]
pub struct Concurrency {
    now: AtomicUsize,
    /// The most publishes in progress at once.
    pub most: AtomicUsize,
    /// The rows published.
    pub rows: AtomicUsize,
}

#[async_trait::async_trait]
impl Publisher for Concurrency {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.rows.fetch_add(batch.len(), Ordering::SeqCst);
        batch.iter().map(|r| Ok(Delivered::new(r.pos).at(0, r.pos))).collect()
    }
}

/// The relay's `outbox_pace_lanes` gauge, as the relay sets it.
#[derive(Default)]
pub struct PaceGauge(Arc<AtomicU64>);

impl PaceGauge {
    pub fn lanes(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::SeqCst))
    }
}

impl metrics::Recorder for PaceGauge {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        if key.name() == outbox_relay::metrics::PACE {
            metrics::Gauge::from_arc(self.0.clone())
        } else {
            metrics::Gauge::noop()
        }
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}
