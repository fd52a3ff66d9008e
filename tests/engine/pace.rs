//! The adaptive pace on PostgreSQL, read from the relay's own gauge. Its end-to-end test, which
//! needs the database server to itself, is in quiet.rs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::observed::{Observed, Observer, StoreCall};
use outbox::Message;
use outbox_tests::db::{commit_each, Service};
use outbox_tests::embedded::{drained, start, test_config, PaceGauge};

use super::Scripted;

/// When each mark ended and each of the lane's looks for rows began; every mark waits
/// [`MarkTimes::MARK`] first, so a batch takes at least that long.
#[derive(Default)]
struct MarkTimes {
    marks: std::sync::Mutex<Vec<Instant>>,
    looks: std::sync::Mutex<Vec<Instant>>,
}

impl MarkTimes {
    const MARK: Duration = Duration::from_secs(1);

    /// How long after the end of mark `n` (from 0) the lane looked again; `None` if not yet.
    fn looked_after_mark(&self, n: usize) -> Option<Duration> {
        let ended = *self.marks.lock().unwrap().get(n)?;
        let looks = self.looks.lock().unwrap();
        looks.iter().find(|at| **at >= ended).map(|at| *at - ended)
    }
}

#[async_trait::async_trait]
impl Observer for MarkTimes {
    async fn before(&self, call: StoreCall) {
        match call {
            StoreCall::MarkPublished => tokio::time::sleep(Self::MARK).await,
            StoreCall::Claim | StoreCall::SetIdle | StoreCall::ReadyLanes => {
                self.looks.lock().unwrap().push(Instant::now());
            }
            _ => {}
        }
    }

    fn after(&self, call: StoreCall, _: usize, _: Duration, _: bool) {
        if call == StoreCall::MarkPublished {
            self.marks.lock().unwrap().push(Instant::now());
        }
    }
}

/// Below one lane the lane that catches up rests after each batch in proportion, but not after
/// the last, short batch of a backlog: it has caught up, and a rest then would only keep it from
/// asking writers for NOTIFY and from claiming the rows committed meanwhile (up to 19 times the
/// batch's time at the pace's floor).
#[tokio::test]
async fn below_one_lane_a_lane_rests_after_a_full_batch_but_not_after_the_short_one_that_drains_it() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    let gauge = PaceGauge::default();
    let _recorder = metrics::set_default_local_recorder(&gauge);
    let store = Arc::new(Observed::new(pg, MarkTimes::default()));
    // One lane, so that every look the observer sees is that lane's.
    const BATCH: usize = 4;
    let cfg = test_config().adaptive_pace(true).batch_size(BATCH).max_lanes(Some(1));
    let relay = start(Arc::clone(&store), Scripted::new([]), cfg);
    let service = Service::writing(&pool).await;
    outbox_tests::wait::until("the pace at half a lane or less", Duration::from_secs(20), || async {
        match gauge.lanes() {
            l if l <= 0.5 => Ok(()),
            l => Err(format!("pace {l}")),
        }
    })
    .await;
    // Two full batches and one short: the first is taken unpaced (the lane had kept up), the
    // second and the third each on a turn of the pace, the lane having caught up with a full one.
    let keys = super::looks::keys_of_lane(0);
    let rows = keys.take(2 * BATCH + 1).map(|k| Message::new("t", "x").key(k));
    commit_each(&pool, rows).await;
    drained(&*store, Duration::from_secs(30)).await;
    let observer = store.observer();
    let after_short = outbox_tests::wait::until("a look after the last mark", Duration::from_secs(30), || async {
        observer.looked_after_mark(2).ok_or_else(|| "not yet".to_owned())
    })
    .await;
    let after_full = observer
        .looked_after_mark(1)
        .expect("the lane looked after its second batch");
    let pace = gauge.lanes();
    service.stop().await;
    relay.stop().await;
    // At a pace of 0.75 or less (it grows by 0.05 a second while the service is busy) the rest
    // after a batch of a second or more is a third of a second or more.
    assert!(
        after_full >= Duration::from_millis(300),
        "the lane rested {after_full:?} after its full batch on a turn of the pace (pace now {pace})"
    );
    assert!(
        after_short < MarkTimes::MARK,
        "the lane rested {after_short:?} after the short batch that drained it (pace now {pace})"
    );
}

/// Lets the first `WORKING` probes of the pace through and holds every later one for ever (a
/// committing transaction that hangs: a synchronous standby gone, a pool without a free
/// connection).
struct ProbesHang(std::sync::atomic::AtomicUsize);

impl ProbesHang {
    /// The probes of the first cycle's working part.
    const WORKING: usize = 8;
}

#[async_trait::async_trait]
impl Observer for ProbesHang {
    async fn before(&self, call: StoreCall) {
        if call == StoreCall::Probe && self.0.fetch_add(1, Ordering::SeqCst) >= Self::WORKING {
            std::future::pending::<()>().await;
        }
    }
}

/// The pace's quiet window holds every lane that catches up while it probes the database; a
/// probe that never answered held them for ever (the backlog stopped after each lane's first
/// batch). A probe now counts as failed after a while, the window ends, and the backlog drains.
#[tokio::test]
async fn a_pace_probe_that_never_answers_does_not_hold_the_lanes() {
    let (pool, pg) = outbox_tests::db::fresh_pg_store().await;
    commit_each(&pool, (0..600).map(|i| Message::new("t", "x").key(format!("k{i}")))).await;
    let store = Arc::new(Observed::new(pg, ProbesHang(Default::default())));
    let cfg = test_config().adaptive_pace(true).batch_size(5);
    let relay = start(Arc::clone(&store), Scripted::slow([], Duration::from_millis(50)), cfg);
    // 3-7 s on a quiet machine (27 s beside a CI run); it stopped at about 350 pending before.
    drained(&*store, Duration::from_secs(60)).await;
    relay.stop().await;
    assert!(
        store.observer().0.load(Ordering::SeqCst) > ProbesHang::WORKING,
        "the quiet window began (a probe was held)"
    );
}
