//! The writers a lane's NOTIFY can miss. Writers notify a lane only while its flag says idle; one
//! that read the flag as busy and commits after the lane's look that follows the flag sends no
//! NOTIFY, and its row would wait for the lane's poll. So the lane remembers the transactions open
//! right after its flag said idle (every one: which of them wrote to the lane cannot be known before
//! they commit), asks which are still open 1 ms later, then twice as long after each answer (up to
//! the poll interval), and after each answer in which some have ended looks whether the lane has a
//! row ready (the lingering lanes' look, one index probe), claiming only then, until none is left:
//! a writer's row is found soon after its commit even while an unrelated long transaction stays
//! open, and a transaction that ends does not make every lane that listed it claim for nothing.

use std::time::{Duration, Instant};

use outbox::Store;

use crate::shared::Shared;

/// The first wait before asking which of the transactions are still open.
const FIRST_ASK: Duration = Duration::from_millis(1);

/// The transactions open when the lane's flag last said idle, of those not known to have ended.
#[derive(Debug, Default)]
pub(crate) struct OpenWriters {
    ids: Vec<i64>,
    /// When to ask next, and how long the wait was.
    next: Option<(Instant, Duration)>,
}

impl OpenWriters {
    /// Right after the lane's flag said idle: the transactions open now. A failure forgets them
    /// (their rows wait for the poll).
    pub(crate) async fn taken<S: Store, P>(shared: &Shared<S, P>) -> Self {
        let Some(wakeups) = shared.store.wakeups() else {
            return Self::default();
        };
        match shared.counted_write(wakeups.open_transactions()).await {
            Ok(ids) if !ids.is_empty() => OpenWriters {
                ids,
                next: Some((Instant::now() + FIRST_ASK, FIRST_ASK)),
            },
            Ok(_) => Self::default(),
            Err(e) => {
                tracing::debug!(error = %e, "could not ask which transactions are open");
                Self::default()
            }
        }
    }

    /// When to ask next which of them are still open, while any may be.
    pub(crate) fn next_ask(&self) -> Option<Instant> {
        self.next.map(|(at, _)| at)
    }

    /// When it is time, asks which of them are still open: true when some have ended since the
    /// last answer and `lane` has a row ready (the lane claims). The wait before the next question
    /// doubles, up to the poll interval. A failure forgets them.
    pub(crate) async fn ended<S: Store, P>(&mut self, shared: &Shared<S, P>, lane: i32) -> bool {
        let (Some((at, wait)), Some(wakeups)) = (self.next, shared.store.wakeups()) else {
            return false;
        };
        if Instant::now() < at {
            return false;
        }
        match shared.counted(wakeups.still_open(&self.ids)).await {
            Ok(open) => {
                let ended = open.len() < self.ids.len();
                let wait = (wait * 2).min(shared.cfg.poll_interval);
                *self = match open.is_empty() {
                    true => Self::default(),
                    false => OpenWriters {
                        ids: open,
                        next: Some((Instant::now() + wait, wait)),
                    },
                };
                // Which of them wrote to the lane is not known: look before claiming (a failed
                // look claims).
                ended
                    && shared
                        .counted(wakeups.ready_lanes(&[(lane, 0)]))
                        .await
                        .map_or(true, |ready| !ready.is_empty())
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not ask which transactions are still open");
                *self = Self::default();
                false
            }
        }
    }
}
