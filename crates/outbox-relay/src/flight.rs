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

/// Waits for the turns a batch needs under `max_busy_lanes` and (`catching_up`) the adaptive pace.
pub(crate) async fn take_turns<S, P>(shared: &Shared<S, P>, catching_up: bool) -> Turns<'_> {
    let capped = match &shared.busy {
        Some(busy) => Some(busy.acquire().await.expect("the semaphore is never closed")),
        None => None,
    };
    let paced = match &shared.adaptive {
        Some(pace) if catching_up => Some(pace.turn().await),
        _ => None,
    };
    (capped, paced)
}
