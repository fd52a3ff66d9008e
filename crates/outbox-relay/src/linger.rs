//! Lanes that linger. A lane that found work keeps its flag saying busy for
//! [`RelayConfig::linger`](crate::RelayConfig::linger) after it runs dry, so committing
//! transactions send no NOTIFY (PostgreSQL makes the commits of notifying transactions take turns);
//! meanwhile one query per [`RelayConfig::linger_poll_interval`](crate::RelayConfig::linger_poll_interval)
//! (with `linger_poll_max`, longer while the adaptive pace finds the relay slows commits, see
//! `crate::pace::gather`) finds which of those lanes got rows and wakes them. Below
//! [`EMPTY_LOOKS_CEILING`], a look that finds none waits twice as long before the next, up to that
//! ([`Looks`]): rows that keep coming are looked for every interval, a trickle does not cost a
//! query every millisecond. A lane whose linger ends sets its flag to idle and waits for NOTIFY as
//! before. Under the adaptive pace, lanes linger only while the database takes more writes than
//! [`RelayConfig::linger_above_writes`](crate::RelayConfig::linger_above_writes) besides the
//! relay's, or when the writers wake the relay in-process ([`lingers_now`]): fewer commits do not
//! feel NOTIFY, and a commit that notifies wakes its lane at once where a lingering one waits for
//! the next look.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use outbox::{Lease, Publisher, Store, LANES};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

const _: () = assert!(LANES <= 64, "the watched lanes are one bit each in a u64");

/// The lanes of this relay that linger, waiting for rows: those that ran dry, and those whose
/// batches in flight hold all they claimed (they look only beyond the last row in flight).
#[derive(Debug, Default)]
pub(crate) struct Watched {
    bits: AtomicU64,
    /// Per lane, the position beyond which a ready row wakes it.
    after: [AtomicI64; LANES as usize],
    added: Notify,
}

impl Watched {
    /// Watches `lane` for a ready row beyond position `after` (0: any row).
    pub(crate) fn add(&self, lane: i32, after: i64) {
        self.after[lane as usize].store(after, Ordering::Release);
        self.bits.fetch_or(1 << lane, Ordering::AcqRel);
        self.added.notify_one();
    }

    pub(crate) fn remove(&self, lane: i32) {
        self.bits.fetch_and(!(1 << lane), Ordering::AcqRel);
    }

    fn lanes(&self) -> Vec<(i32, i64)> {
        let bits = self.bits.load(Ordering::Acquire);
        (0..LANES)
            .filter(|l| bits & (1 << l) != 0)
            .map(|l| (l, self.after[l as usize].load(Ordering::Acquire)))
            .collect()
    }
}

/// Whether lanes of this relay linger: the store has a wake-up on commit (without one, writers
/// never notify and there is nothing to spare them) and the linger is not zero.
pub(crate) fn enabled<S: Store, P: Publisher>(shared: &Shared<S, P>) -> bool {
    !shared.cfg.linger.is_zero() && shared.store.wakeups().is_some()
}

/// Whether a lane of this relay lingers now: it may ([`enabled`]), and under the adaptive pace the
/// others write often enough for NOTIFY to cost them ([`crate::pace::lanes_linger`]). A relay its
/// writers wake in-process ([`crate::Relay::wake_on`]) always lingers: their commits wake it at
/// once anyway, and a NOTIFY beside each would only add an empty claim.
pub(crate) fn lingers_now<S: Store, P: Publisher>(shared: &Shared<S, P>) -> bool {
    enabled(shared) && (shared.local.is_some() || shared.adaptive.as_ref().is_none_or(|pace| pace.lingers()))
}

/// Looks at the lingering lanes every `linger_poll_interval` (under the adaptive pace with a
/// `linger_poll_max`, up to that while the relay slows commits, waiting out the pace's quiet
/// window) and wakes those with a ready row. A failed look only costs latency: each lane's linger
/// ends anyway, and then NOTIFY and the poll take over.
pub(crate) async fn watch<S: Store, P: Publisher>(shared: Arc<Shared<S, P>>) {
    let Some(wakeups) = shared.store.wakeups().filter(|_| enabled(&shared)) else {
        return;
    };
    let mut looks = Looks::default();
    loop {
        let mut lanes = shared.watched.lanes();
        if lanes.is_empty() {
            shared.watched.added.notified().await;
        }
        match &shared.adaptive {
            Some(pace) => {
                let every = pace.watch_every(shared.cfg.linger_poll_interval);
                tokio::time::sleep(looks.wait(every)).await;
                // The quiet window is the pace's measure of commits without the relay; a look that
                // may gather waits it out, but never more than one interval more.
                if crate::pace::gather::gathers(&shared.cfg) {
                    let _ = tokio::time::timeout(every, pace.not_quiet()).await;
                }
            }
            None => tokio::time::sleep(looks.wait(shared.cfg.linger_poll_interval)).await,
        }
        lanes = shared.watched.lanes();
        if lanes.is_empty() {
            continue;
        }
        match shared.counted(wakeups.ready_lanes(&lanes)).await {
            Ok(ready) => {
                looks.found(!ready.is_empty());
                for lane in ready {
                    shared.wake_lane(lane);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not look at the lingering lanes");
                tokio::time::sleep(shared.cfg.poll_interval).await;
            }
        }
    }
}

/// The longest the look waits after looks that found nothing, when its interval is shorter (the
/// default interval).
const EMPTY_LOOKS_CEILING: Duration = Duration::from_millis(5);

/// The wait before the next look: the interval after a look that found rows, twice as long after
/// each one that found none, up to [`EMPTY_LOOKS_CEILING`] (or the interval, if longer).
#[derive(Debug, Default)]
struct Looks {
    /// Looks in a row that found no row.
    empty: u32,
}

impl Looks {
    fn wait(&self, every: Duration) -> Duration {
        (every * (1 << self.empty.min(8))).min(EMPTY_LOOKS_CEILING.max(every))
    }

    fn found(&mut self, any: bool) {
        self.empty = if any { 0 } else { self.empty.saturating_add(1) };
    }
}

/// Waits, watched (see [`crate::linger`]) for any ready row of the lane, until the lane is woken or
/// `until`; true when stopped.
pub(crate) async fn linger_wait<S: Store, P: Publisher>(
    shared: &Shared<S, P>,
    lease: &Lease,
    until: Instant,
    stop: &CancellationToken,
) -> bool {
    shared.watched.add(lease.lane, 0);
    let woken = shared.woken(lease.lane);
    let stopped = tokio::select! {
        _ = woken => false,
        _ = tokio::time::sleep_until(until.into()) => false,
        _ = stop.cancelled() => true,
    };
    shared.watched.remove(lease.lane);
    stopped
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Looks, Watched};

    #[test]
    fn looks_that_find_nothing_come_twice_as_far_apart_up_to_5_ms() {
        let ms = Duration::from_millis;
        let mut looks = Looks::default();
        let mut waits = vec![looks.wait(ms(1))];
        for _ in 0..5 {
            looks.found(false);
            waits.push(looks.wait(ms(1)));
        }
        assert_eq!(waits, [ms(1), ms(2), ms(4), ms(5), ms(5), ms(5)]);
        looks.found(true);
        assert_eq!(
            looks.wait(ms(1)),
            ms(1),
            "a look that finds rows brings the next one back"
        );
        looks.found(false);
        assert_eq!(looks.wait(ms(2)), ms(4));
        looks.found(false);
        assert_eq!(looks.wait(ms(2)), ms(5));
        assert_eq!(looks.wait(ms(20)), ms(20), "an interval of 5 ms or more stays as it is");
    }

    #[test]
    fn lanes_are_added_and_removed_one_bit_each() {
        let w = Watched::default();
        w.add(0, 0);
        w.add(31, 7);
        w.add(5, 0);
        assert_eq!(w.lanes(), vec![(0, 0), (5, 0), (31, 7)]);
        w.remove(5);
        w.remove(7);
        w.add(0, 12);
        assert_eq!(w.lanes(), vec![(0, 12), (31, 7)]);
    }
}
