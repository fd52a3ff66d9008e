//! The in-process wake-up of a relay embedded in the writers' process: [`crate::Outbox::commit`]
//! wakes the lanes the committing task enqueued into, so the relay claims at once instead of
//! waiting for NOTIFY, its watch or its poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::task::Id;

use crate::LANES;

/// Tasks with enqueues not yet committed that are remembered at the most. Beyond that the records
/// are forgotten, and the next commit that finds no record of its own wakes every lane.
const MAX_TASKS: usize = 4096;

const _: () = assert!(LANES <= 64, "a lane mask is a u64");

/// One wake-up per lane, shared by the writers' [`crate::Outbox`] and an embedded relay
/// (`Relay::wake_on`). Cloning shares it.
#[derive(Debug, Clone)]
pub struct LocalWakeup(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    lanes: Vec<Notify>,
    /// Whether a relay listens: until then writers record nothing.
    listened: AtomicBool,
    /// Per task, the lanes it enqueued into since its last [`crate::Outbox::commit`]; `None` for
    /// code outside any tokio task (a runtime's `block_on`, `#[tokio::main]`'s body), taken as one task.
    enqueued: Mutex<HashMap<Option<Id>, u64>>,
    /// Records were forgotten (past [`MAX_TASKS`]): the next commit without a record of its own
    /// wakes every lane, so a forgotten row is not left to the poll.
    forgotten: AtomicBool,
}

impl Default for LocalWakeup {
    fn default() -> Self {
        LocalWakeup(Arc::new(Inner {
            lanes: (0..LANES).map(|_| Notify::new()).collect(),
            listened: AtomicBool::new(false),
            enqueued: Mutex::new(HashMap::new()),
            forgotten: AtomicBool::new(false),
        }))
    }
}

impl LocalWakeup {
    /// Marks the wake-up as listened to: from now on writers record the lanes they enqueue into.
    pub(crate) fn listen(&self) -> Self {
        self.0.listened.store(true, Ordering::Relaxed);
        self.clone()
    }

    /// Records that the current task enqueued into `lanes`.
    pub(crate) fn enqueued(&self, lanes: impl IntoIterator<Item = i32>) {
        if !self.0.listened.load(Ordering::Relaxed) {
            return;
        }
        let task = tokio::task::try_id();
        let mask = lanes.into_iter().fold(0u64, |m, lane| m | 1 << lane.rem_euclid(LANES));
        let mut enqueued = self.0.enqueued.lock().unwrap_or_else(|e| e.into_inner());
        if enqueued.len() >= MAX_TASKS && !enqueued.contains_key(&task) {
            // Tasks that rolled back leave records behind. Forgotten, a live one's row is found by
            // the next commit without a record (it wakes every lane), NOTIFY or the poll.
            enqueued.clear();
            self.0.forgotten.store(true, Ordering::Relaxed);
        }
        *enqueued.entry(task).or_default() |= mask;
    }

    /// The current task committed: wakes the lanes it enqueued into. A commit without a record of
    /// its own (its transaction enqueued nothing) wakes nothing, or every lane once after records
    /// were forgotten. (A transaction enqueued in one task and committed in another is found by
    /// NOTIFY or the relay's poll instead.)
    pub(crate) fn committed(&self) {
        if !self.0.listened.load(Ordering::Relaxed) {
            return;
        }
        let task = tokio::task::try_id();
        let recorded = {
            let mut enqueued = self.0.enqueued.lock().unwrap_or_else(|e| e.into_inner());
            enqueued.remove(&task)
        };
        let mask = recorded.unwrap_or_else(|| {
            if self.0.forgotten.swap(false, Ordering::Relaxed) {
                u64::MAX
            } else {
                0
            }
        });
        for lane in 0..LANES {
            if mask & 1 << lane != 0 {
                self.wake(lane);
            }
        }
    }

    /// Wakes `lane`'s waiter, or its next one when none waits now (lanes out of range: nothing).
    pub fn wake(&self, lane: i32) {
        if let Some(n) = usize::try_from(lane).ok().and_then(|l| self.0.lanes.get(l)) {
            n.notify_one();
        }
    }

    /// Completes when `lane` is woken (`lane` is taken modulo [`LANES`]).
    pub fn notified(&self, lane: i32) -> Notified<'_> {
        self.0.lanes[lane.rem_euclid(LANES) as usize].notified()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::LocalWakeup;

    async fn woken(w: &LocalWakeup, lane: i32) -> bool {
        tokio::time::timeout(Duration::from_millis(20), w.notified(lane))
            .await
            .is_ok()
    }

    // A test body runs in `block_on`, which has no task id: the writers here are spawned tasks.
    async fn in_task(w: &LocalWakeup, f: impl FnOnce(LocalWakeup) + Send + 'static) {
        let w = w.clone();
        tokio::spawn(async move { f(w) }).await.unwrap();
    }

    #[tokio::test]
    async fn a_commit_wakes_the_lanes_its_task_enqueued_into() {
        let w = LocalWakeup::default().listen();
        // Another task's enqueue, not committed yet: its lane is not woken by this commit.
        in_task(&w, |w| w.enqueued([9])).await;
        in_task(&w, |w| {
            w.enqueued([3, 5]);
            w.enqueued([5]);
            w.committed();
        })
        .await;
        assert!(woken(&w, 3).await && woken(&w, 5).await);
        assert!(
            !woken(&w, 9).await,
            "a lane no committed transaction wrote to stays asleep"
        );
        assert!(!woken(&w, 4).await);
        // A commit with nothing recorded, its transaction having enqueued nothing, wakes no lane.
        in_task(&w, |w| w.committed()).await;
        w.committed();
        assert!(!woken(&w, 4).await && !woken(&w, 9).await);
        // Outside any task (here the test's own body) counts as one task of its own.
        w.enqueued([7]);
        in_task(&w, |w| w.committed()).await;
        assert!(!woken(&w, 7).await, "another task's commit does not wake it");
        w.committed();
        assert!(woken(&w, 7).await && !woken(&w, 4).await);
    }

    #[tokio::test]
    async fn without_a_listener_nothing_is_recorded() {
        let w = LocalWakeup::default();
        in_task(&w, |w| {
            w.enqueued([1]);
            assert!(w.0.enqueued.lock().unwrap().is_empty());
            w.committed();
        })
        .await;
        assert!(!woken(&w, 1).await);
    }
}
