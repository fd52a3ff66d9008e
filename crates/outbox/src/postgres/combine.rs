//! Lanes that claim, or mark, at the same moment share one statement.
//!
//! A call joins the requests waiting for the next statement. Up to `at_once` statements run at a
//! time, each in a task of its own, so a caller that stops waiting does not stop the statement
//! others wait for. When a statement ends, the next one takes every request that came meanwhile. A
//! lane alone waits for nothing: its statement starts at once. Lanes woken together (the linger's
//! watch, a burst of commits, confirmations that arrive together) share one statement where each
//! ran its own: the database parses, plans and commits once for all of them. For that, a new
//! statement's task lets the tasks ready beside it run before it takes its first group (one
//! yield): the runtime runs a task spawned by a running one next, ahead of the lanes woken with
//! it, so it took the first lane alone, and the second slot the next one. At 5,000 msg/s the yield
//! took the claims from 0.22-0.26 statements a message to 0.10-0.11, the marks from 0.34-0.39 to
//! 0.29-0.30 (BENCHMARKS.md, figure 3). A patient combiner ([`Combiner::patience`], the marks')
//! starts its second statement only for a request that waited that long for the first: the marks
//! that come one by one while a mark statement runs go together in the next (0.22 statements a
//! message at 5,000 msg/s against 0.29). A request may also have the statement it starts wait a
//! moment for the others first ([`Combiner::call_gathering`], the marks of few rows):
//! PostgreSQL at 5,000 msg/s took 0.33-0.44 cores against 0.49-0.55.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::{Error, Result};

type Reply<Resp> = oneshot::Sender<Result<Resp>>;

pub(super) struct Combiner<Req, Resp> {
    at_once: usize,
    /// How long a request waits for the statement running before another one starts for it.
    patience: Duration,
    state: Mutex<State<Req, Resp>>,
}

struct State<Req, Resp> {
    waiting: Vec<(Req, Reply<Resp>)>,
    running: usize,
}

impl<Req, Resp> std::fmt::Debug for Combiner<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Combiner")
            .field("at_once", &self.at_once)
            .field("patience", &self.patience)
            .field("waiting", &state.waiting.len())
            .field("running", &state.running)
            .finish()
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Combiner<Req, Resp> {
    /// A combiner that runs up to `at_once` statements at a time.
    pub(super) fn new(at_once: usize) -> Self {
        Combiner {
            at_once: at_once.max(1),
            patience: Duration::ZERO,
            state: Mutex::new(State {
                waiting: Vec::new(),
                running: 0,
            }),
        }
    }

    /// A request that comes while a statement runs waits up to `patience` for it (and then joins
    /// the next statement with every request that came meanwhile) before another statement starts
    /// for it. Zero (the default): the next statement starts at once while fewer than `at_once`
    /// run.
    pub(super) fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Answers `req` from the next statement: `run` gets every request waiting then and answers
    /// each, in order.
    pub(super) async fn call<F, Fut>(self: &Arc<Self>, req: Req, run: F) -> Result<Resp>
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Resp>>> + Send + 'static,
    {
        self.call_gathering(req, Duration::ZERO, run).await
    }

    /// As [`Combiner::call`]; a statement this request starts waits `gather` before it takes its
    /// first group, so that requests coming within it share the statement (zero: it only lets the
    /// tasks ready beside it ask first).
    pub(super) async fn call_gathering<F, Fut>(self: &Arc<Self>, req: Req, gather: Duration, run: F) -> Result<Resp>
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Resp>>> + Send + 'static,
    {
        let (reply, mut answer) = oneshot::channel();
        let mut start = {
            let mut state = self.lock();
            state.waiting.push((req, reply));
            (state.running == 0 || self.patience.is_zero()) && self.take_place(&mut state)
        };
        if !start && !self.patience.is_zero() {
            if let Ok(answered) = tokio::time::timeout(self.patience, &mut answer).await {
                return answered.unwrap_or_else(|_| Err(ended_early()));
            }
            // The statement running is held up (a locked row, a slow disk): the requests waiting
            // get one of their own, if there is room.
            let mut state = self.lock();
            start = !state.waiting.is_empty() && self.take_place(&mut state);
        }
        if start {
            self.serve(run, gather);
        }
        answer.await.unwrap_or_else(|_| Err(ended_early()))
    }

    /// Takes a place for a new statement if fewer than `at_once` run.
    fn take_place(&self, state: &mut State<Req, Resp>) -> bool {
        let start = state.running < self.at_once;
        state.running += usize::from(start);
        start
    }

    /// Runs statements in a task of their own, on the place just taken, the first after `gather`.
    fn serve<F, Fut>(self: &Arc<Self>, run: F, gather: Duration)
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Resp>>> + Send + 'static,
    {
        let running = Running {
            combiner: Arc::clone(self),
            gave_up: false,
        };
        tokio::spawn(running.serve(run, gather));
    }
}

fn ended_early() -> Error {
    shared_failed("its task ended before it answered")
}

impl<Req, Resp> Combiner<Req, Resp> {
    fn lock(&self) -> MutexGuard<'_, State<Req, Resp>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The error the other requests of a failed statement get (the first one gets the database's own).
fn shared_failed(why: &str) -> Error {
    Error::Database(sqlx::Error::Io(std::io::Error::other(format!(
        "a statement shared by several lanes failed: {why}"
    ))))
}

/// One running statement's task. It gives its place up when nothing is left to run, in the same
/// lock as it looks (a request that came a moment later starts a task of its own), or when it
/// ends otherwise (a panic, the runtime shutting down): then the requests left waiting get an error.
struct Running<Req, Resp> {
    combiner: Arc<Combiner<Req, Resp>>,
    gave_up: bool,
}

impl<Req: Send + 'static, Resp: Send + 'static> Running<Req, Resp> {
    async fn serve<F, Fut>(mut self, run: F, gather: Duration)
    where
        F: Fn(Vec<Req>) -> Fut,
        Fut: Future<Output = Result<Vec<Resp>>>,
    {
        // The lanes woken with the caller ask first (see the module's doc), or every request that
        // comes within `gather`.
        if gather.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(gather).await;
        }
        while let Some(group) = self.next() {
            let (reqs, replies): (Vec<Req>, Vec<Reply<Resp>>) = group.into_iter().unzip();
            match run(reqs).await {
                Ok(answers) => {
                    // A reply without an answer is dropped: its caller gets an error.
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    let mut replies = replies.into_iter();
                    if let Some(first) = replies.next() {
                        let _ = first.send(Err(e));
                    }
                    for reply in replies {
                        let _ = reply.send(Err(shared_failed(&why)));
                    }
                }
            }
        }
    }

    fn next(&mut self) -> Option<Vec<(Req, Reply<Resp>)>> {
        let mut state = self.combiner.lock();
        if state.waiting.is_empty() {
            state.running -= 1;
            self.gave_up = true;
            return None;
        }
        Some(std::mem::take(&mut state.waiting))
    }
}

impl<Req, Resp> Drop for Running<Req, Resp> {
    fn drop(&mut self) {
        if !self.gave_up {
            let mut state = self.combiner.lock();
            state.running -= 1;
            if state.running == 0 {
                state.waiting.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    type Answers = std::pin::Pin<Box<dyn Future<Output = Result<Vec<u32>>> + Send>>;

    /// Each request is answered by its own value doubled; `runs` counts the statements.
    fn double(runs: &Arc<AtomicUsize>) -> impl Fn(Vec<u32>) -> Answers + Send + 'static {
        double_in(runs, 20)
    }

    /// [`double`] by statements that take `ms` milliseconds.
    fn double_in(runs: &Arc<AtomicUsize>, ms: u64) -> impl Fn(Vec<u32>) -> Answers + Send + 'static {
        let runs = Arc::clone(runs);
        move |reqs: Vec<u32>| {
            runs.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(reqs.into_iter().map(|r| r * 2).collect())
            })
        }
    }

    /// Awaits `calls`, the i-th made with request i, and checks that each got its own request
    /// doubled.
    async fn assert_doubled(calls: impl IntoIterator<Item = tokio::task::JoinHandle<u32>>) {
        let answers: Vec<u32> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let expected: Vec<u32> = (0..answers.len() as u32).map(|i| i * 2).collect();
        assert_eq!(answers, expected);
    }

    #[tokio::test]
    async fn requests_that_come_together_share_a_statement_and_get_their_own_answers() {
        let combiner = Arc::new(Combiner::new(1));
        let runs = Arc::new(AtomicUsize::new(0));
        let calls = (0..16u32).map(|i| {
            let (combiner, run) = (Arc::clone(&combiner), double(&runs));
            tokio::spawn(async move { combiner.call(i, run).await.unwrap() })
        });
        assert_doubled(calls).await;
        let runs = runs.load(Ordering::SeqCst);
        assert!(runs <= 2, "16 requests at once took {runs} statements");
        assert_eq!(combiner.lock().running, 0, "the task gave its place up");
        // Alone, a request starts a statement at once.
        assert_eq!(
            combiner.call(5, double(&Arc::new(AtomicUsize::new(0)))).await.unwrap(),
            10
        );
    }

    /// The watch wakes the lanes that got rows at the same moment; their claims share a statement
    /// although two may run at a time. A runtime of one worker, so the order the tasks run in is
    /// the runtime's, not the threads': the last task at the barrier wakes the others on that
    /// worker (the test's own body runs on a thread of its own, and woke them from outside, in
    /// batches the worker took in as they came: 3 statements in 2 of 12 runs on a busy machine).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn requests_woken_together_share_one_statement_with_two_at_a_time() {
        for round in 0..20 {
            let combiner = Arc::new(Combiner::new(2));
            let runs = Arc::new(AtomicUsize::new(0));
            let woken = Arc::new(tokio::sync::Barrier::new(8));
            let calls: Vec<_> = (0..8u32)
                .map(|i| {
                    let (combiner, run, woken) = (Arc::clone(&combiner), double(&runs), Arc::clone(&woken));
                    tokio::spawn(async move {
                        woken.wait().await;
                        combiner.call(i, run).await.unwrap()
                    })
                })
                .collect();
            assert_doubled(calls).await;
            let runs = runs.load(Ordering::SeqCst);
            // Before the yield, always 3: the first lane alone, the second alone, then the six
            // others. Now 1, or 2 when the runtime had not yet taken every woken task in.
            assert!(
                runs <= 2,
                "round {round}: 8 requests woken together took {runs} statements"
            );
            assert_eq!(combiner.lock().running, 0, "every task gave its place up");
        }
    }

    /// Requests that come while a statement runs wait for it, one after another; a patient
    /// combiner starts its second statement only for requests that waited `patience` for it.
    #[tokio::test]
    async fn requests_that_come_while_a_statement_runs_wait_for_it_when_patient() {
        for (patience, expected) in [(Duration::ZERO, 3), (Duration::from_secs(5), 2)] {
            let combiner = Arc::new(Combiner::new(2).patience(patience));
            let runs = Arc::new(AtomicUsize::new(0));
            // Statements of 200 ms; requests at 0, 50, 100 and 120 ms.
            let calls: Vec<_> = [0u64, 50, 100, 120]
                .into_iter()
                .zip(0u32..)
                .map(|(after, i)| {
                    let (combiner, run) = (Arc::clone(&combiner), double_in(&runs, 200));
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(after)).await;
                        combiner.call(i, run).await.unwrap()
                    })
                })
                .collect();
            assert_doubled(calls).await;
            // Impatient: the first alone, the second alone in the other slot, then the last two.
            // Patient: the first alone, then the three that came while it ran.
            let runs = runs.load(Ordering::SeqCst);
            assert_eq!(runs, expected, "patience {patience:?}");
            assert_eq!(combiner.lock().running, 0, "every task gave its place up");
        }
    }

    /// A statement started by a request that gathers waits `gather` before it takes its first
    /// group: a request that comes within it shares the statement, where without it the first ran
    /// alone.
    #[tokio::test]
    async fn a_request_that_comes_within_the_gather_shares_the_first_statement() {
        for (gather, expected) in [(Duration::ZERO, 2), (Duration::from_millis(600), 1)] {
            let combiner = Arc::new(Combiner::new(1));
            let runs = Arc::new(AtomicUsize::new(0));
            // Statements of 20 ms; requests at 0 and 200 ms.
            let calls: Vec<_> = [0u64, 200]
                .into_iter()
                .zip(0u32..)
                .map(|(after, i)| {
                    let (combiner, run) = (Arc::clone(&combiner), double(&runs));
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(after)).await;
                        combiner.call_gathering(i, gather, run).await.unwrap()
                    })
                })
                .collect();
            assert_doubled(calls).await;
            let runs = runs.load(Ordering::SeqCst);
            assert_eq!(runs, expected, "gather {gather:?}");
            assert_eq!(combiner.lock().running, 0, "every task gave its place up");
        }
    }

    /// A statement held up (a locked row) keeps a patient combiner's second slot closed only for
    /// `patience`: the requests behind it get a statement of their own.
    #[tokio::test]
    async fn a_held_statement_holds_the_others_up_only_for_the_patience() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(2).patience(Duration::from_millis(50)));
        let release = Arc::new(tokio::sync::Notify::new());
        let held = {
            let (combiner, release) = (Arc::clone(&combiner), Arc::clone(&release));
            tokio::spawn(async move {
                combiner
                    .call(1, move |reqs: Vec<u32>| {
                        let release = Arc::clone(&release);
                        async move {
                            release.notified().await;
                            Ok(reqs)
                        }
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let other = tokio::time::timeout(Duration::from_secs(10), combiner.call(2, double(&runs))).await;
        assert_eq!(
            other
                .expect("the second request waited for the held statement")
                .unwrap(),
            4
        );
        assert!(!held.is_finished(), "the held statement still runs");
        release.notify_one();
        assert_eq!(held.await.unwrap().unwrap(), 1);
        assert_eq!(combiner.lock().running, 0, "every task gave its place up");
    }

    #[tokio::test]
    async fn a_failed_statement_fails_every_request_in_it_and_the_next_one_runs() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(1));
        let fail = |_: Vec<u32>| async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            Err(Error::Database(sqlx::Error::PoolTimedOut))
        };
        let calls = (0..4u32).map(|i| {
            let combiner = Arc::clone(&combiner);
            tokio::spawn(async move { combiner.call(i, fail).await })
        });
        for answer in futures::future::join_all(calls).await {
            let err = answer.unwrap().expect_err("the statement failed");
            assert!(err.is_retryable(), "{err}");
        }
        let runs = Arc::new(AtomicUsize::new(0));
        assert_eq!(combiner.call(3, double(&runs)).await.unwrap(), 6);
    }

    #[tokio::test]
    async fn a_statement_that_panics_fails_its_requests_and_frees_its_place() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(1));
        let panics = |_: Vec<u32>| async { panic!("the statement panicked") };
        let err = combiner.call(1, panics).await.expect_err("no answer");
        assert!(err.to_string().contains("ended before it answered"), "{err}");
        let runs = Arc::new(AtomicUsize::new(0));
        assert_eq!(combiner.call(2, double(&runs)).await.unwrap(), 4);
    }
}
