//! Tests that need the database server to themselves: `cargo test` runs one test binary at a
//! time, and this one holds a single test. The adaptive pace counts the transaction ids the whole
//! server hands out, so another test writing beside it (on a database of its own, the same server)
//! reads as a busy service.

use std::time::Duration;

use outbox_tests::db::Service;
use outbox_tests::embedded::{start, test_config, Concurrency, PaceGauge};

/// The adaptive pace on PostgreSQL, end to end: with nobody else on the database it lets more
/// lanes work; a service that starts writing brings it below one lane (it is told by the
/// transaction ids the service takes); once the service stops, the pace grows again.
#[tokio::test]
async fn the_adaptive_pace_gives_way_to_a_service_that_starts_writing_and_comes_back_after() {
    let pool = outbox_tests::db::fresh_pg().await;
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
    let service = Service::writing(&pool).await;
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
    service.stop().await;
    outbox_tests::wait::until("the pace back above one lane", Duration::from_secs(30), pace).await;
    relay.stop().await;
}
