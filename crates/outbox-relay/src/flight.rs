//! A lane's batches in flight: published by their own tasks at once, settled (marked) in the order
//! they were claimed. A key is in at most one batch in flight, so a failure of one of its rows can
//! hold back the rest of the key before anything later of it is sent.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use outbox::StoredMessage;
use tokio::sync::SemaphorePermit;
use tokio::task::JoinHandle;

use crate::batch::Sent;
use crate::pace;
use crate::shared::Shared;

/// What a batch holds while in flight: a turn under `max_busy_lanes` and one under the adaptive
/// pace, each when set.
pub(crate) type Turns<'a> = (Option<SemaphorePermit<'a>>, Option<pace::Turn<'a>>);

pub(crate) struct InFlight<'a> {
    task: JoinHandle<Sent>,
    /// The broker's answer, once the task gave it.
    answer: Option<Sent>,
    pub(crate) turns: Turns<'a>,
    /// When its round began (its turn taken), for the adaptive pace's rest.
    pub(crate) started: Instant,
    /// It took all the claim allowed: more rows are probably waiting.
    pub(crate) full: bool,
    /// When its newest row was committed: about when the rows behind a full batch began to wait.
    pub(crate) newest: chrono::DateTime<chrono::Utc>,
    positions: Vec<i64>,
    keys: HashSet<String>,
}

impl<'a> InFlight<'a> {
    pub(crate) fn new(
        task: JoinHandle<Sent>,
        turns: Turns<'a>,
        rows: &[StoredMessage],
        started: Instant,
        full: bool,
    ) -> Self {
        InFlight {
            task,
            answer: None,
            turns,
            started,
            full,
            newest: rows.iter().map(|r| r.created_at).max().unwrap_or_else(chrono::Utc::now),
            positions: rows.iter().map(|r| r.pos).collect(),
            keys: rows.iter().filter_map(|r| r.key.clone()).collect(),
        }
    }
}

/// A batch dropped before it was settled (its lane aborted at `shutdown_grace`) stops its publish
/// task: a publisher that sends a key's messages one after another would otherwise go on sending
/// them after the lease was given up, behind the next owner's copies of the key's later messages.
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The lane's batches in flight, oldest first.
#[derive(Default)]
pub(crate) struct Flight<'a> {
    queue: VecDeque<InFlight<'a>>,
}

impl<'a> Flight<'a> {
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Rows in flight, all batches together.
    pub(crate) fn rows(&self) -> usize {
        self.queue.iter().map(|b| b.positions.len()).sum()
    }

    /// Every position in flight (the claim leaves them out).
    pub(crate) fn positions(&self) -> Vec<i64> {
        self.queue.iter().flat_map(|b| b.positions.iter().copied()).collect()
    }

    /// The last position in flight (0 when none).
    pub(crate) fn last_position(&self) -> i64 {
        self.queue
            .iter()
            .flat_map(|b| b.positions.iter().copied())
            .max()
            .unwrap_or(0)
    }

    /// Whether a batch in flight holds a row of `key`.
    pub(crate) fn holds(&self, key: Option<&str>) -> bool {
        key.is_some_and(|k| self.queue.iter().any(|b| b.keys.contains(k)))
    }

    pub(crate) fn push(&mut self, batch: InFlight<'a>) {
        self.queue.push_back(batch);
    }

    /// Gives up the turns of every batch in flight (the oldest one's marks keep failing, and the
    /// later ones wait for it).
    pub(crate) fn give_up_turns(&mut self) {
        for batch in &mut self.queue {
            batch.turns = (None, None);
        }
    }

    /// Waits until the oldest batch has its broker's answer (cancel-safe); pending forever when
    /// nothing is in flight.
    pub(crate) async fn oldest_answered(&mut self) {
        match self.queue.front_mut() {
            Some(b) if b.answer.is_none() => {
                let sent = joined((&mut b.task).await);
                b.answer = Some(sent);
            }
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Takes the oldest batch and its broker's answer (waiting for it).
    pub(crate) async fn pop(&mut self) -> Option<(InFlight<'a>, Sent)> {
        let mut batch = self.queue.pop_front()?;
        let sent = match batch.answer.take() {
            Some(sent) => sent,
            None => joined((&mut batch.task).await),
        };
        Some((batch, sent))
    }
}

/// A publisher that panicked panics the lane, as it did when it was called on the lane's own task.
fn joined(r: Result<Sent, tokio::task::JoinError>) -> Sent {
    match r {
        Ok(sent) => sent,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a publish task was cancelled: {e}"),
    }
}

/// Waits for the turns a batch needs: (`catching_up`) one under the adaptive pace, then one under
/// `max_busy_lanes`. The pace's comes first: a lane waiting for it held a busy slot meanwhile, which
/// a lane that keeps up (it needs no pace turn) waited for. A quiet window that begins while the
/// lane waits for its slot has it give both back and wait for the window's end.
pub(crate) async fn take_turns<S, P>(shared: &Shared<S, P>, catching_up: bool) -> Turns<'_> {
    loop {
        let paced = match &shared.adaptive {
            Some(pace) if catching_up => Some(pace.turn().await),
            _ => None,
        };
        let Some(busy) = &shared.busy else {
            return (None, paced);
        };
        let capped = busy.acquire().await.expect("the semaphore is never closed");
        let quiet = shared.adaptive.as_ref().is_some_and(pace::Adaptive::is_quiet);
        if paced.is_none() || !quiet {
            return (Some(capped), paced);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::config::RelayConfig;

    /// Lanes that share a relay with `max_busy_lanes` and the adaptive pace.
    fn shared(max_busy_lanes: usize) -> Shared<(), ()> {
        let cfg = RelayConfig::default().max_busy_lanes(Some(max_busy_lanes));
        Shared {
            store: (),
            publisher: (),
            wake: Vec::new(),
            local: None,
            busy: cfg.max_busy_lanes.map(tokio::sync::Semaphore::new),
            adaptive: Some(Default::default()),
            rate: None,
            backoff: cfg.retry_backoff().unwrap(),
            meters: crate::metrics::Meters::new(None),
            health: Default::default(),
            watched: Default::default(),
            cfg,
        }
    }

    /// A lane waiting for the pace's turn held a busy slot meanwhile: a lane that keeps up (it
    /// needs no pace turn) waited behind it, though fewer lanes than the cap were working.
    #[tokio::test]
    async fn a_lane_waiting_for_the_pace_holds_no_busy_slot() {
        let shared = shared(2);
        let _working = take_turns(&shared, true).await;
        let mut waiting = Box::pin(take_turns(&shared, true));
        assert!((&mut waiting).now_or_never().is_none(), "the pace has one turn");
        assert!(
            take_turns(&shared, false).now_or_never().is_some(),
            "a lane that keeps up waited for a slot held by a lane waiting for the pace"
        );
    }
}
