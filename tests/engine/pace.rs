//! The adaptive pace on PostgreSQL, read from the relay's own gauge.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_tests::embedded::{start, test_config};

use super::Concurrency;

/// The relay's `outbox_pace_lanes` gauge, as the relay sets it.
#[derive(Default)]
struct PaceGauge(Arc<AtomicU64>);

impl PaceGauge {
    fn lanes(&self) -> f64 {
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

/// The adaptive pace on PostgreSQL, end to end: with nobody else on the database it lets more
/// lanes work; a service that starts writing brings it below one lane (it is told by the
/// transaction ids the service takes); once the service stops, the pace grows again.
#[tokio::test]
async fn the_adaptive_pace_gives_way_to_a_service_that_starts_writing_and_comes_back_after() {
    let pool = outbox_tests::db::fresh_pg().await;
    outbox_tests::db::exec(&pool, "CREATE TABLE service_rows (x INT)").await;
    let gauge = PaceGauge::default();
    // The tokio test runs every task on this thread: the relay registers its gauge here.
    let _recorder = metrics::set_default_local_recorder(&gauge);
    let store = outbox::postgres::PgStore::new(pool.clone());
    let relay = start(store, Concurrency::default(), test_config().adaptive_pace(true));
    let pace = || async {
        match gauge.lanes() {
            l if l >= 2.0 => Ok(()),
            l => Err(format!("pace {l}")),
        }
    };
    outbox_tests::wait::until(
        "the pace above one lane, nobody else busy",
        Duration::from_secs(20),
        pace,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    outbox_tests::db::exec(&pool, "INSERT INTO service_rows VALUES (1)").await;
                }
            })
        })
        .collect();
    outbox_tests::wait::until(
        "the pace below one lane, a service writing",
        Duration::from_secs(10),
        || async {
            match gauge.lanes() {
                l if l < 1.0 => Ok(()),
                l => Err(format!("pace {l}")),
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    outbox_tests::wait::until("the pace back above one lane", Duration::from_secs(30), pace).await;
    relay.stop().await;
}
