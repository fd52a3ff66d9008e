//! Gaps under `Hold`: a successor delivered before its predecessor is parked and applied right
//! after it, and parked messages whose predecessor is gone for good can be released in order.

/// The `Hold` scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_hold {
    () => {
        #[tokio::test]
        async fn under_hold_a_successor_delivered_first_is_parked_and_applied_right_after_its_predecessor() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Recorder>(GapPolicy::Hold).await;
            // The relay re-sent K:1 and K:2 after a timeout: the partition holds K:2, then K:1.
            let id2 = Uuid::now_v7().to_string();
            let headers2: Vec<(&str, &[u8])> = vec![
                ("outbox-id", id2.as_bytes()),
                ("outbox-key", b"K"),
                ("outbox-seq", b"2"),
                ("content-type", b"application/json"),
                ("raw", b"\x00\xff\x01"),
                ("empty", b""),
                ("raw", b"again"),
            ];
            let k2 = Incoming::from_headers("orders", b"{\"n\":2}", headers2.clone()).unwrap();
            for expected in [Outcome::Parked, Outcome::Duplicate] {
                // Done for the runner (it stores the offset and moves on), not applied yet; the
                // second delivery is a duplicate of the parked message.
                let out = inbox.process(&pool, &k2, &handler).await.unwrap();
                assert!(out.is_done(), "{out:?}");
                assert_eq!(out, expected);
            }
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert!(handler.calls().is_empty());
            // Other keys meanwhile: "m" in order, "n" in reverse (3 and 2 wait for 1).
            let m: Vec<_> = (1..=2).map(|seq| keyed("m", seq)).collect();
            let n: Vec<_> = (1..=3).map(|seq| keyed("n", seq)).collect();
            for msg in &m {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }
            for msg in [&n[2], &n[1], &n[2]] {
                let out = inbox.process(&pool, msg, &handler).await.unwrap();
                assert!(out.is_done(), "{out:?}");
                assert_ne!(out, Outcome::Processed);
            }
            assert_eq!(counter("outbox_inbox_parked_total", &c), 3);
            assert_eq!(counter("outbox_inbox_duplicates_total", &c), 2);
            assert_eq!(parked_rows(&pool, &c).await, 3);

            // K:1 arrives: K:2 is applied right after it, in the same transaction.
            let k1 = keyed("K", 1);
            assert_eq!(
                inbox.process(&pool, &k1, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(
                inbox.process(&pool, &n[0], &handler).await.unwrap(),
                Outcome::Processed
            );
            let order = handler.order();
            let expected: Vec<(String, i64)> = [
                ("m", 1),
                ("m", 2),
                ("K", 1),
                ("K", 2),
                ("n", 1),
                ("n", 2),
                ("n", 3),
            ]
            .iter()
            .map(|(k, s)| ((*k).to_owned(), *s))
            .collect();
            assert_eq!(order, expected);
            // The parked message reached the handler as it was delivered.
            let saw = handler.calls().into_iter().find(|s| s.id == k2.id).unwrap();
            assert_eq!(saw, Saw::of(&k2));
            assert_eq!(saw.payload, b"{\"n\":2}");
            assert_eq!(
                saw.headers,
                headers2
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
                    .collect::<Vec<_>>()
            );
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_seq(&pool, &c, "K").await, Some(2));
            assert_eq!(key_seq(&pool, &c, "n").await, Some(3));

            // Every message again: duplicates, nothing applied twice.
            for msg in [&k2, &k1].into_iter().chain(&m).chain(&n) {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "{msg:?}"
                );
            }
            for msg in [&k2, &k1].into_iter().chain(&m).chain(&n) {
                assert_eq!(effects_of(&pool, msg.id).await, 1, "{msg:?}");
            }
            assert_eq!(effects(&pool).await, 7);
            assert_eq!(handler.calls().len(), 7);
            // The key goes on as usual.
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "K", 3).await,
                Outcome::Processed
            );
            assert_eq!(counter("outbox_inbox_processed_total", &c), 8);
            assert_eq!(counter("outbox_inbox_unparked_total", &c), 3);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
        }

        #[tokio::test]
        async fn under_hold_a_key_first_seen_above_1_waits_for_its_beginning_without_stalling() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Recorder>(GapPolicy::Hold).await;
            // 4 and 2 wait for 1; 3 is missing when 1 comes: 1 and 2 apply, 4 keeps waiting.
            for seq in [4, 2] {
                let out = deliver_with(&inbox, &pool, &handler, "k", seq).await;
                assert!(out.is_done(), "{out:?}");
                assert_eq!(out, Outcome::Parked);
            }
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "k", 1).await,
                Outcome::Processed
            );
            assert_eq!(handler.order(), [("k".to_owned(), 1), ("k".to_owned(), 2)]);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(2));
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "k", 3).await,
                Outcome::Processed
            );
            assert_eq!(handler.order(), [1, 2, 3, 4].map(|s| ("k".to_owned(), s)));
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
            // Under Hold nothing was skipped: no gap was recorded.
            assert_eq!(gaps(&pool, &c, "k").await, []);
            for seq in 1..=4 {
                assert_eq!(
                    deliver_with(&inbox, &pool, &handler, "k", seq).await,
                    Outcome::Duplicate
                );
            }
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn under_hold_a_failing_parked_successor_stays_parked_and_its_predecessor_is_applied() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Hold).await;
            let handler = Recorder::failing_once("k", 2);
            let (k2, k3) = (keyed("k", 2), keyed("k", 3));
            for m in [&k3, &k2] {
                assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Parked);
            }
            let k1 = keyed("k", 1);
            let err = inbox.process(&pool, &k1, &handler).await.unwrap_err();
            assert!(
                matches!(err, InboxError::ParkedHandler { id, seq: 2, error: Boom } if id == k2.id),
                "{err:?}"
            );
            assert!(err.is_retryable() && !err.is_infrastructure());
            // 1 is applied; 2 failed and stays parked, and 3 waits behind it.
            assert_eq!(effects_of(&pool, k1.id).await, 1);
            assert_eq!(effects(&pool).await, 1);
            assert_eq!(parked_rows(&pool, &c).await, 2);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
            let k4 = keyed("k", 4);
            assert_eq!(inbox.process(&pool, &k4, &handler).await.unwrap(), Outcome::Parked);
            // 1 delivered again (as a runner does after the error): a duplicate that applies what
            // follows it.
            assert_eq!(
                inbox.process(&pool, &k1, &handler).await.unwrap(),
                Outcome::Duplicate
            );
            for m in [&k1, &k2, &k3, &k4] {
                assert_eq!(effects_of(&pool, m.id).await, 1);
            }
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(4));
            for m in [&k1, &k2, &k3, &k4] {
                assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Duplicate);
            }
            assert_eq!(effects(&pool).await, 4);
            let seqs: Vec<i64> = handler.order().into_iter().map(|(_, s)| s).collect();
            assert_eq!(seqs, [1, 2, 2, 3, 4]);
        }

        /// A parked message whose handler failed stays parked; another copy of it (a re-send, a
        /// redelivery after a rebalance, from another partition) arrives right after its
        /// predecessor and is applied directly. Its parked copy was left behind, below the key's
        /// highest seq: every later parked message of the key waited behind it for ever, and
        /// `release_parked` failed on it.
        #[tokio::test]
        async fn under_hold_a_parked_message_applied_by_another_copy_does_not_hold_the_key() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Hold).await;
            let handler = Recorder::failing_once("k", 2);
            let (k1, k2, k3) = (keyed("k", 1), keyed("k", 2), keyed("k", 3));
            for m in [&k3, &k2] {
                assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Parked);
            }
            let err = inbox.process(&pool, &k1, &handler).await.unwrap_err();
            assert!(matches!(err, InboxError::ParkedHandler { seq: 2, .. }), "{err:?}");
            assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
            // Another copy of 2: it follows the key's highest seq, so it is applied, and 3 with it.
            assert_eq!(inbox.process(&pool, &k2, &handler).await.unwrap(), Outcome::Processed);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(3));
            assert_eq!(parked_rows(&pool, &c).await, 0);
            for m in [&k1, &k2, &k3] {
                assert_eq!(effects_of(&pool, m.id).await, 1);
            }
            assert_eq!(
                inbox.release_parked(&pool, None, "k", &handler).await.unwrap(),
                0
            );
        }

        /// The same left-behind copy, by another route (the consumer ran under `Accept` for a
        /// while: a message parked before is applied directly, past its gap): under `Hold` again,
        /// `release_parked` (the operator's way out) failed on it ("does not follow its highest
        /// applied seq") and a later message of the key waited behind it. It is dropped.
        #[tokio::test]
        async fn a_parked_copy_of_a_message_applied_under_accept_is_dropped_under_hold() {
            let (pool, c, hold) = inbox_on_fresh_pool(GapPolicy::Hold).await;
            let accept = Inbox::new(&c).gap_policy(GapPolicy::Accept);
            let handler = Recorder::default();
            let (k2, k3, k5) = (keyed("k", 2), keyed("k", 3), keyed("k", 5));
            assert_eq!(hold.process(&pool, &k2, &handler).await.unwrap(), Outcome::Parked);
            assert_eq!(accept.process(&pool, &k2, &handler).await.unwrap(), Outcome::Processed);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(2));
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(hold.release_parked(&pool, None, "k", &handler).await.unwrap(), 0);
            assert_eq!(parked_rows(&pool, &c).await, 0);
            // And found by the next message of the key instead.
            assert_eq!(hold.process(&pool, &k5, &handler).await.unwrap(), Outcome::Parked);
            assert_eq!(accept.process(&pool, &k5, &handler).await.unwrap(), Outcome::Processed);
            let k6 = keyed("k", 6);
            assert_eq!(hold.process(&pool, &k6, &handler).await.unwrap(), Outcome::Processed);
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(hold.process(&pool, &k3, &handler).await.unwrap(), Outcome::Processed);
            for m in [&k2, &k3, &k5, &k6] {
                assert_eq!(effects_of(&pool, m.id).await, 1);
            }
        }

        #[tokio::test]
        async fn under_hold_a_parked_message_that_failed_behind_applied_ones_is_applied_on_the_redelivery() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Hold).await;
            let handler = Recorder::failing_once("k", 3);
            let (k1, k2, k3) = (keyed("k", 1), keyed("k", 2), keyed("k", 3));
            for m in [&k3, &k2] {
                assert_eq!(inbox.process(&pool, m, &handler).await.unwrap(), Outcome::Parked);
            }
            let err = inbox.process(&pool, &k1, &handler).await.unwrap_err();
            assert!(matches!(err, InboxError::ParkedHandler { seq: 3, .. }), "{err:?}");
            // 1 and 2 are applied: the key is at 2, 3 stays parked right above it.
            assert_eq!(key_seq(&pool, &c, "k").await, Some(2));
            assert_eq!(parked_rows(&pool, &c).await, 1);
            // 1 delivered again: a duplicate whose key is past it; 3 follows the key's highest seq.
            assert_eq!(
                inbox.process(&pool, &k1, &handler).await.unwrap(),
                Outcome::Duplicate
            );
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(3));
            for m in [&k1, &k2, &k3] {
                assert_eq!(effects_of(&pool, m.id).await, 1);
            }
            let seqs: Vec<i64> = handler.order().into_iter().map(|(_, s)| s).collect();
            assert_eq!(seqs, [1, 2, 3, 3]);
        }

        #[tokio::test]
        async fn under_hold_a_predecessor_and_its_successor_delivered_concurrently_apply_once_in_order() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Hold).await;
            // Sleeping inside the transaction keeps the first delivery uncommitted while the others
            // arrive.
            let handler = Arc::new(Recorder {
                sleep: Duration::from_millis(50),
                ..Recorder::default()
            });
            // Each seq delivered twice; the deliveries start 5 ms apart in the order given, or all
            // at once.
            let mut keys = Vec::new();
            for (order, stagger) in [
                ([2, 1, 2, 1], 5),
                ([1, 2, 1, 2], 5),
                ([2, 1, 1, 2], 0),
                ([1, 2, 2, 1], 0),
            ] {
                let key: &'static str = Box::leak(format!("k-{}", Uuid::new_v4().simple()).into_boxed_str());
                keys.push(key);
                let msgs = [keyed(key, 1), keyed(key, 2)];
                let tasks: Vec<_> = order
                    .into_iter()
                    .enumerate()
                    .map(|(i, seq)| {
                        let (pool, inbox, handler) = (pool.clone(), inbox.clone(), handler.clone());
                        let msg = msgs[seq as usize - 1].clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(stagger * i as u64)).await;
                            inbox.process(&pool, &msg, &*handler).await.unwrap()
                        })
                    })
                    .collect();
                for t in tasks {
                    let out = t.await.unwrap();
                    assert!(out.is_done(), "{order:?}: {out:?}");
                }
                for msg in &msgs {
                    assert_eq!(effects_of(&pool, msg.id).await, 1, "{order:?}");
                }
                assert_eq!(key_seq(&pool, &c, key).await, Some(2), "{order:?}");
            }
            assert_eq!(parked_rows(&pool, &c).await, 0);
            let order = handler.order();
            for key in keys {
                let of_key: Vec<i64> = order.iter().filter(|(k, _)| k == key).map(|(_, s)| *s).collect();
                assert_eq!(of_key, [1, 2], "{key}");
            }
        }

        #[tokio::test]
        async fn parked_messages_whose_predecessor_is_gone_for_good_can_be_released_in_order() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Recorder>(GapPolicy::Hold).await;
            let source = Uuid::new_v4().to_string();
            let sourced = |seq: i64| keyed("k", seq).source(source.as_str());
            // 1 and 2 are lost for good (say, discarded dead letters); 3 and 5 wait for them.
            for seq in [5, 3] {
                assert_eq!(
                    inbox.process(&pool, &sourced(seq), &handler).await.unwrap(),
                    Outcome::Parked
                );
            }
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "other", 2).await,
                Outcome::Parked
            );
            // Nothing parked for that key, or that source: nothing to do.
            assert_eq!(inbox.release_parked(&pool, None, "k", &handler).await.unwrap(), 0);
            assert_eq!(
                inbox
                    .release_parked(&pool, Some(source.as_str()), "none", &handler)
                    .await
                    .unwrap(),
                0
            );
            assert!(handler.calls().is_empty());
            // Looking did not create a key row for the default source.
            assert_eq!(key_rows(&pool, &c).await, 2);

            assert_eq!(
                inbox
                    .release_parked(&pool, Some(source.as_str()), "k", &handler)
                    .await
                    .unwrap(),
                2
            );
            assert_eq!(handler.order(), [3, 5].map(|s| ("k".to_owned(), s)));
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 2);
            // The seqs given up on are open gaps: if they ever arrive, they apply, once.
            let gap_rows = count(
                &pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_gaps WHERE consumer = '{c}' AND source = '{source}'"),
            )
            .await;
            assert_eq!(gap_rows, 2);
            let steps = [
                (sourced(4), Outcome::Processed),
                (sourced(4), Outcome::Duplicate),
                (sourced(5), Outcome::Duplicate),
                (sourced(6), Outcome::Processed),
                (sourced(1), Outcome::Processed),
            ];
            process_steps(&inbox, &pool, &handler, &steps).await;
            assert_eq!(handler.order(), [3, 5, 4, 6, 1].map(|s| ("k".to_owned(), s)));
            assert_eq!(effects(&pool).await, 5);
            // A failing handler releases nothing.
            let failing = Recorder::failing_once("other", 2);
            let err = inbox
                .release_parked(&pool, None, "other", &failing)
                .await
                .unwrap_err();
            assert!(matches!(err, InboxError::Handler(Boom)), "{err:?}");
            assert_eq!(parked_rows(&pool, &c).await, 1);
            assert_eq!(
                inbox
                    .release_parked(&pool, None, "other", &failing)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(
                deliver_with(&inbox, &pool, &handler, "other", 3).await,
                Outcome::Processed
            );
            assert_eq!(effects(&pool).await, 7);
        }
    };
}
