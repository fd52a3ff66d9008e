//! Gaps under `Accept`: a skipped seq is recorded as an open gap, and the skipped message arriving
//! late is processed once.

/// The gap scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_gaps {
    () => {
        #[tokio::test]
        async fn a_gap_under_accept_is_processed_counted_and_moves_the_key_on() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            assert_eq!(inbox.clone().gap_policy(GapPolicy::Accept).consumer(), c);
            let handler = Effect::default();
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Processed);
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 4).await, Outcome::Processed);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
            // The skipped seqs are recorded as an open gap.
            assert_eq!(gaps(&pool, &c, "k").await, [(2, 3)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(2));
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 5).await, Outcome::Processed);
            // A key first seen above seq 1 has skipped its beginning.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "late", 7).await,
                Outcome::Processed
            );
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 2);
            assert_eq!(gaps(&pool, &c, "late").await, [(1, 6)]);
            assert_eq!(effects(&pool).await, 4);
        }

        /// A seq of `i64::MAX` (a hand-made or corrupt header) was processed, and then every
        /// later message of its key failed on PostgreSQL and MySQL (`seq + 1` out of range),
        /// taken for database trouble: the runner waited for ever. It is refused as malformed
        /// (dead-lettered), and so is a seq below 1 given to `Incoming::keyed`.
        #[tokio::test]
        async fn a_seq_the_database_cannot_count_past_is_refused_and_the_key_goes_on() {
            let (pool, _, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            for seq in [i64::MAX, 0, -1] {
                let err = inbox
                    .process(&pool, &keyed("k", seq), &handler)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(
                        err,
                        InboxError::MalformedHeader {
                            name: outbox::HEADER_SEQ,
                            ..
                        }
                    ),
                    "{seq}: {err:?}"
                );
                assert!(!err.is_retryable() && !err.is_infrastructure(), "{seq}: {err:?}");
            }
            deliver_each(&inbox, &pool, &handler, "k", [1, 2], Outcome::Processed).await;
            assert_eq!(effects(&pool).await, 2);
        }

        #[tokio::test]
        async fn a_skipped_message_arriving_late_is_processed_once_and_only_it() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            deliver_each(&inbox, &pool, &handler, "k", [1, 2], Outcome::Processed).await;
            // 3 timed out at the producer ("possibly persisted") while 4 went through; 5 follows.
            deliver_each(&inbox, &pool, &handler, "k", [4, 5], Outcome::Processed).await;
            assert_eq!(gaps(&pool, &c, "k").await, [(3, 3)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(3));
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);

            // The relay sends 3 again: it is new, its effect applies.
            let late = keyed("k", 3);
            assert_eq!(
                inbox.process(&pool, &late, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(effects_of(&pool, late.id).await, 1);
            assert_eq!(gaps(&pool, &c, "k").await, []);
            assert_eq!(gap_from(&pool, &c, "k").await, None);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(5));
            assert_eq!(counter("outbox_inbox_gap_fills_total", &c), 1);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 1);

            // Delivered again (same id, or a new one): a duplicate. So is anything below or at the top.
            assert_eq!(
                inbox.process(&pool, &late, &handler).await.unwrap(),
                Outcome::Duplicate
            );
            deliver_each(&inbox, &pool, &handler, "k", [3, 1, 2, 4, 5], Outcome::Duplicate).await;
            assert_eq!(effects_of(&pool, late.id).await, 1);
            assert_eq!(effects(&pool).await, 5);
            assert_eq!(counter("outbox_inbox_processed_total", &c), 5);
            assert_eq!(counter("outbox_inbox_duplicates_total", &c), 6);
        }

        #[tokio::test]
        async fn only_seqs_inside_a_gap_are_new_below_the_highest() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            // Two gaps: 4..=5 and 8..=9.
            deliver_each(
                &inbox,
                &pool,
                &handler,
                "k",
                [1, 2, 3, 6, 7, 10],
                Outcome::Processed,
            )
            .await;
            assert_eq!(gaps(&pool, &c, "k").await, [(4, 5), (8, 9)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(4));
            // Below the lowest gap, between the gaps, at the top: duplicates, and the gaps are untouched.
            deliver_each(&inbox, &pool, &handler, "k", [1, 3, 6, 7, 10], Outcome::Duplicate).await;
            assert_eq!(gaps(&pool, &c, "k").await, [(4, 5), (8, 9)]);
            // Filling the lower gap leaves the upper one, and gap_from follows.
            deliver_each(&inbox, &pool, &handler, "k", [5, 4], Outcome::Processed).await;
            assert_eq!(gaps(&pool, &c, "k").await, [(8, 9)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(8));
            deliver_each(&inbox, &pool, &handler, "k", [4, 5, 7], Outcome::Duplicate).await;
            // Above the highest is still the plain path; another key is not concerned.
            let steps = [
                (keyed("k", 11), Outcome::Processed),
                (keyed("other", 1), Outcome::Processed),
                (keyed("other", 1), Outcome::Duplicate),
            ];
            process_steps(&inbox, &pool, &handler, &steps).await;
            assert_eq!(gap_from(&pool, &c, "other").await, None);
            assert_eq!(effects(&pool).await, 10);
        }

        #[tokio::test]
        async fn a_gap_of_several_seqs_is_filled_in_any_order() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            let orders: [(&'static str, [i64; 5]); 5] = [
                ("ascending", [2, 3, 4, 5, 6]),
                ("descending", [6, 5, 4, 3, 2]),
                ("middle-first", [4, 2, 6, 3, 5]),
                ("edges-last", [3, 5, 4, 6, 2]),
                ("shuffled", [5, 2, 3, 6, 4]),
            ];
            for (key, order) in orders {
                assert_eq!(deliver(&inbox, &pool, &handler, key, 1).await, Outcome::Processed);
                assert_eq!(deliver(&inbox, &pool, &handler, key, 7).await, Outcome::Processed);
                assert_eq!(gaps(&pool, &c, key).await, [(2, 6)]);
                let mut missing: Vec<i64> = (2..=6).collect();
                for seq in order {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Processed,
                        "{key} {seq}"
                    );
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Duplicate,
                        "{key} {seq}"
                    );
                    missing.retain(|s| *s != seq);
                    // The open ranges are exactly the runs of seqs still missing.
                    let runs = runs(&missing);
                    assert_eq!(gaps(&pool, &c, key).await, runs, "{key} after {seq}");
                    assert_eq!(
                        gap_from(&pool, &c, key).await,
                        runs.first().map(|r| r.0),
                        "{key} after {seq}"
                    );
                }
                assert_eq!(key_seq(&pool, &c, key).await, Some(7));
                for seq in 1..=7 {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Duplicate,
                        "{key} {seq}"
                    );
                }
            }
            assert_eq!(effects(&pool).await, 5 * 7);
            assert_eq!(handler.calls.load(Ordering::SeqCst), 5 * 7);
        }

        #[tokio::test]
        async fn a_key_first_seen_above_1_can_still_get_its_beginning() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 3).await, Outcome::Processed);
            assert_eq!(gaps(&pool, &c, "k").await, [(1, 2)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(1));
            for seq in [1, 2] {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Processed
                );
                assert_eq!(
                    deliver(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Duplicate
                );
            }
            assert_eq!(gaps(&pool, &c, "k").await, []);
            assert_eq!(effects(&pool).await, 3);
        }

        #[tokio::test]
        async fn a_failing_handler_on_a_late_message_keeps_the_gap_open() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            deliver_each(&inbox, &pool, &handler, "k", [1, 5], Outcome::Processed).await;
            let failing = Effect {
                failures: AtomicUsize::new(1),
                ..Effect::default()
            };
            let late = keyed("k", 3);
            let err = inbox.process(&pool, &late, &failing).await.unwrap_err();
            assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
            // Rolled back with the handler's writes: the gap is whole, the retry applies it once.
            assert_eq!(gaps(&pool, &c, "k").await, [(2, 4)]);
            assert_eq!(effects_of(&pool, late.id).await, 0);
            process_twice(&inbox, &pool, &late, &failing).await;
            assert_eq!(effects_of(&pool, late.id).await, 1);
            assert_eq!(gaps(&pool, &c, "k").await, [(2, 2), (4, 4)]);
        }
    };
}
