//! A failing handler leaves no record behind, and concurrent deliveries of one message (or of a gap
//! and its skipped message) apply each effect once.

/// The failure and concurrency scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_concurrency {
    () => {
        #[tokio::test]
        async fn a_failing_handler_leaves_no_record_and_the_retry_applies_once() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            for msg in [unkeyed(), keyed("k", 1)] {
                let handler = Effect {
                    failures: AtomicUsize::new(2),
                    ..Effect::default()
                };
                let recorded = id_rows(&pool, &c).await;
                for _ in 0..2 {
                    let err = inbox.process(&pool, &msg, &handler).await.unwrap_err();
                    assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
                    assert!(err.is_retryable());
                    // The handler's write and the dedup record were rolled back together.
                    assert_eq!(effects_of(&pool, msg.id).await, 0);
                    assert_eq!(id_rows(&pool, &c).await, recorded);
                    assert_eq!(key_seq(&pool, &c, "k").await, None);
                }
                process_twice(&inbox, &pool, &msg, &handler).await;
                assert_eq!(effects_of(&pool, msg.id).await, 1);
                assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
            }
            assert_eq!(id_rows(&pool, &c).await, 1);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
        }

        #[tokio::test]
        async fn concurrent_deliveries_of_one_message_apply_it_once() {
            let (pool, _, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            // The first delivery stays uncommitted while the others arrive: they wait for it and then
            // see its record.
            let handler = Effect::slow();
            // Unkeyed, a new key, a key that exists already.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "old", 1).await,
                Outcome::Processed
            );
            for msg in [unkeyed(), keyed("new", 1), keyed("old", 2)] {
                let outcomes = deliver_concurrently(&inbox, &pool, &handler, &msg).await;
                assert_eq!(tally(&outcomes), (1, 7), "{msg:?}: {outcomes:?}");
                assert_eq!(effects_of(&pool, msg.id).await, 1, "{msg:?}");
            }
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn concurrent_deliveries_of_a_skipped_message_apply_it_once() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            let handler = Effect::slow();
            // Gaps 2..=2 (filled whole), 4..=8 (split in the middle), 10..=11 (cut at its start).
            deliver_each(&inbox, &pool, &handler, "k", [1, 3, 9, 12], Outcome::Processed).await;
            assert_eq!(gaps(&pool, &c, "k").await, [(2, 2), (4, 8), (10, 11)]);
            for seq in [2, 6, 10] {
                let msg = keyed("k", seq);
                let outcomes = deliver_concurrently(&inbox, &pool, &handler, &msg).await;
                assert_eq!(tally(&outcomes), (1, 7), "seq {seq}: {outcomes:?}");
                assert_eq!(effects_of(&pool, msg.id).await, 1, "seq {seq}");
            }
            assert_eq!(gaps(&pool, &c, "k").await, [(4, 5), (7, 8), (11, 11)]);
            assert_eq!(gap_from(&pool, &c, "k").await, Some(4));
            assert_eq!(effects(&pool).await, 4 + 3);
        }

        #[tokio::test]
        async fn a_gap_and_its_skipped_message_delivered_concurrently_both_apply() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            let handler = Effect::slow();
            // 5 and 3 race on the key row: whichever goes first, both apply, and 2 and 4 stay missing.
            // Each seq is delivered twice; the deliveries start 5 ms apart in the order given, or all
            // at once.
            for (order, stagger) in [([5, 3, 5, 3], 5), ([3, 5, 3, 5], 5), ([5, 3, 3, 5], 0)] {
                let key: &'static str = Box::leak(format!("k-{}", Uuid::new_v4().simple()).into_boxed_str());
                assert_eq!(deliver(&inbox, &pool, &handler, key, 1).await, Outcome::Processed);
                let tasks: Vec<_> = order
                    .into_iter()
                    .enumerate()
                    .map(|(i, seq)| {
                        let (pool, inbox, handler) = (pool.clone(), inbox.clone(), handler.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(stagger * i as u64)).await;
                            inbox.process(&pool, &keyed(key, seq), &*handler).await.unwrap()
                        })
                    })
                    .collect();
                let mut outcomes = Vec::new();
                for t in tasks {
                    outcomes.push(t.await.unwrap());
                }
                // The first delivery of each seq processes it; the second is a duplicate.
                assert_eq!(tally(&outcomes), (2, 2), "{outcomes:?}");
                assert_eq!(key_seq(&pool, &c, key).await, Some(5));
                assert_eq!(gaps(&pool, &c, key).await, [(2, 2), (4, 4)]);
                for seq in [2, 4] {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Processed
                    );
                }
                assert_eq!(gaps(&pool, &c, key).await, []);
            }
        }
    };
}
