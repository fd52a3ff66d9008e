use super::*;

fn handler_error() -> InboxError<String> {
    InboxError::Handler("boom".into())
}

#[test]
fn outcomes_are_done_and_counted() {
    let stats = RunnerStats::default();
    for o in [
        Outcome::Processed,
        Outcome::Duplicate,
        Outcome::Parked,
        Outcome::Processed,
    ] {
        let res: Result<Outcome, InboxError> = Ok(o);
        assert_eq!(Disposition::of(&res, 3, 5, &stats, Uuid::nil()), Disposition::Done);
    }
    assert_eq!(stats.processed.load(Relaxed), 2);
    assert_eq!(stats.duplicates.load(Relaxed), 1);
    assert_eq!(stats.parked.load(Relaxed), 1);
}

#[test]
fn database_trouble_waits_whatever_the_attempts() {
    let stats = RunnerStats::default();
    let err: Result<Outcome, InboxError> = Err(InboxError::Database(sqlx::Error::PoolTimedOut));
    assert_eq!(
        Disposition::of(&err, 99, 5, &stats, Uuid::nil()),
        Disposition::WaitForDatabase
    );
    assert_eq!(stats.infrastructure_retries.load(Relaxed), 1);
    assert_eq!(stats.retries.load(Relaxed), 0);
}

#[test]
fn handler_errors_retry_until_the_last_attempt_then_dead_letter() {
    let stats = RunnerStats::default();
    let err: Result<Outcome, _> = Err(handler_error());
    assert_eq!(
        Disposition::of(&err, 0, 3, &stats, Uuid::nil()),
        Disposition::Retry { attempt: 1 }
    );
    assert_eq!(
        Disposition::of(&err, 1, 3, &stats, Uuid::nil()),
        Disposition::Retry { attempt: 2 }
    );
    assert_eq!(
        Disposition::of(&err, 2, 3, &stats, Uuid::nil()),
        Disposition::DeadLetter { attempts: 3 }
    );
    assert_eq!(stats.retries.load(Relaxed), 2);
    let missing: Result<Outcome, InboxError> = Err(InboxError::MissingHeader("outbox-id"));
    assert_eq!(
        Disposition::of(&missing, 0, 3, &stats, Uuid::nil()),
        Disposition::DeadLetter { attempts: 1 },
        "nothing can fix a message without its id"
    );
}
#[cfg(feature = "postgres")]
mod in_place {
    use super::*;

    struct Never;

    #[async_trait::async_trait]
    impl Handler<sqlx::Postgres> for Never {
        type Error = std::io::Error;

        async fn handle(
            &self,
            _: &mut sqlx::Transaction<'_, sqlx::Postgres>,
            _: &Incoming<'_>,
        ) -> Result<(), std::io::Error> {
            unreachable!("no message is processed here")
        }
    }

    fn core() -> RunnerCore<sqlx::Postgres, Never> {
        let pool = sqlx::PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        RunnerCore::new(pool, Inbox::new("test"), Never)
    }

    fn decided(disposition: Disposition) -> Tried {
        Tried::Decided {
            id: Uuid::nil(),
            disposition,
            error: "boom".into(),
            parked: None,
        }
    }

    const RETRY: RetryInPlace = RetryInPlace {
        backoff: match Backoff::new(Duration::from_millis(10), Duration::from_secs(5)) {
            Ok(b) => b,
            Err(_) => panic!("a valid backoff"),
        },
        waiting: "the queue",
    };

    /// Waits after `failures` in a row, as far as the jitter lets the test tell.
    fn waits_after(failures: u32) -> impl Fn(Step) -> bool {
        move |step| match step {
            Step::Again { delay, .. } => {
                let cap = RETRY.backoff.ceiling(failures);
                delay >= cap / 2 && delay <= cap
            }
            Step::Done => false,
        }
    }

    fn attempts(step: Step) -> Option<u32> {
        match step {
            Step::Again { attempts, .. } => Some(attempts),
            Step::Done => None,
        }
    }

    async fn written(_: String, _: u32, _: Option<crate::Parked>) -> Result<(), String> {
        Ok(())
    }

    #[tokio::test]
    async fn database_waits_by_the_streak_and_done_ends_it() {
        let core = core();
        let wait = || core.step(decided(Disposition::WaitForDatabase), 2, &RETRY, written);
        let first = wait().await;
        assert!(waits_after(1)(first), "{first:?}");
        assert_eq!(attempts(first), Some(2), "the handler's failures stay as they were");
        for streak in 2..=6 {
            let step = wait().await;
            assert!(waits_after(streak)(step), "{streak}: {step:?}");
        }
        assert_eq!(
            core.step(decided(Disposition::Done), 2, &RETRY, written).await,
            Step::Done
        );
        let step = wait().await;
        assert!(waits_after(1)(step), "a success ends the streak: {step:?}");
    }

    #[tokio::test]
    async fn retries_wait_by_their_own_count() {
        let step = core()
            .step(decided(Disposition::Retry { attempt: 6 }), 5, &RETRY, written)
            .await;
        assert!(waits_after(6)(step), "{step:?}");
        assert_eq!(attempts(step), Some(6));
    }

    #[tokio::test]
    async fn dead_letters_are_counted_or_wait_when_refused() {
        let core = core();
        let seen = std::sync::Mutex::new(Vec::new());
        let step = core
            .step(
                decided(Disposition::DeadLetter { attempts: 5 }),
                4,
                &RETRY,
                |e, n, _| {
                    seen.lock().unwrap().push((e, n));
                    async { Ok::<(), String>(()) }
                },
            )
            .await;
        assert_eq!(step, Step::Done);
        let unreadable = Tried::Unreadable {
            error: "missing header outbox-id".into(),
        };
        let step = core
            .step(unreadable, 0, &RETRY, |e, n, _| {
                seen.lock().unwrap().push((e, n));
                async { Err::<(), _>("refused") }
            })
            .await;
        assert_eq!(
            step,
            Step::Again {
                attempts: 0,
                delay: Duration::from_secs(5)
            }
        );
        assert_eq!(
            seen.into_inner().unwrap(),
            [("boom".to_owned(), 5), ("missing header outbox-id".to_owned(), 0)]
        );
        assert_eq!(core.stats().dead_lettered.load(Relaxed), 1);
        assert_eq!(core.stats().infrastructure_retries.load(Relaxed), 1);
    }
}

#[tokio::test]
async fn cleanups_are_due_on_schedule_or_never() {
    let soon = CleanupSchedule::new(Some(Duration::from_millis(1)));
    tokio::time::timeout(Duration::from_secs(5), soon.due())
        .await
        .expect("due after its interval");
    let never = CleanupSchedule::new(None);
    assert!(tokio::time::timeout(Duration::from_millis(20), never.due())
        .await
        .is_err());
}
