//! Duplicates: every redelivery is recognised, by id (unkeyed) or by seq (keyed), keys and
//! consumers compared byte for byte, on one connection as on many.

/// The duplicate scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_dedup {
    () => {
        #[tokio::test]
        async fn every_message_delivered_twice_has_its_effect_once() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            let mut msgs: Vec<Incoming<'static>> = Vec::new();
            for seq in 1..=5 {
                for key in ["k1", "k2", "k3"] {
                    msgs.push(keyed(key, seq));
                }
                msgs.push(unkeyed());
            }
            // Deliver each message, then its duplicate right away, then the whole stream again.
            for m in &msgs {
                process_twice(&inbox, &pool, m, &handler).await;
            }
            for m in &msgs {
                assert_eq!(
                    inbox.process(&pool, m, &handler).await.unwrap(),
                    Outcome::Duplicate
                );
            }
            assert_eq!(effects(&pool).await, msgs.len() as i64);
            for m in &msgs {
                assert_eq!(effects_of(&pool, m.id).await, 1);
            }
            assert_eq!(handler.calls.load(Ordering::SeqCst), msgs.len());
            // Keyed messages leave one row per key, unkeyed ones one row per message.
            assert_eq!(key_rows(&pool, &c).await, 3);
            assert_eq!(key_seq(&pool, &c, "k2").await, Some(5));
            assert_eq!(id_rows(&pool, &c).await, 5);
            assert_eq!(counter("outbox_inbox_processed_total", &c), msgs.len() as u64);
            assert_eq!(
                counter("outbox_inbox_duplicates_total", &c),
                2 * msgs.len() as u64
            );
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
        }

        #[tokio::test]
        async fn values_the_database_cannot_hold_are_the_messages_fault_not_a_wait() {
            // Keys and topics as another outbox database or broker may carry them: a NUL character
            // (PostgreSQL's text cannot hold it), a key too long for an index entry, a topic longer
            // than a parked message's column. Each is processed, or refused as the message's own
            // fault (dead-lettered by a runner), never taken for database trouble to wait out.
            let long_key: &'static str = Box::leak(
                (0..250)
                    .map(|_| Uuid::new_v4().simple().to_string())
                    .collect::<String>()
                    .into_boxed_str(),
            );
            let long_topic: &'static str = Box::leak("t".repeat(300).into_boxed_str());
            for policy in [GapPolicy::Accept, GapPolicy::Hold] {
                let (pool, _, inbox, handler) = inbox_and_handler::<Effect>(policy).await;
                let msgs = [
                    Incoming::new(Uuid::now_v7(), "orders", b"payload").keyed("a\u{0}b", 1),
                    Incoming::new(Uuid::now_v7(), "orders", b"payload").keyed(long_key, 1),
                    Incoming::new(Uuid::now_v7(), long_topic, b"payload").keyed("k", 2),
                ];
                for msg in &msgs {
                    match inbox.process(&pool, msg, &handler).await {
                        Ok(outcome) => assert!(outcome.is_done(), "{policy:?} {msg:?}: {outcome:?}"),
                        Err(e) => assert!(
                            !e.is_infrastructure() && !e.is_retryable(),
                            "{policy:?} {:?}: {e:?}",
                            msg.key.unwrap_or_default().chars().take(8).collect::<String>()
                        ),
                    }
                }
            }
        }

        #[tokio::test]
        async fn one_connection_serves_every_kind_of_delivery_in_a_row() {
            // A backend that answers through session state (MySQL: LAST_INSERT_ID) must not read a
            // previous delivery's answer: on one connection, every kind follows every other kind.
            let pool = pool().await;
            let one: Pool = sqlx::pool::PoolOptions::new()
                .max_connections(1)
                .connect_with((*pool.connect_options()).clone())
                .await
                .unwrap();
            let c = consumer();
            let inbox = Inbox::new(&c);
            let handler = Effect::default();
            let first = unkeyed();
            let steps: Vec<(Incoming<'static>, Outcome)> = vec![
                (first.clone(), Outcome::Processed),
                (first.clone(), Outcome::Duplicate),
                (unkeyed(), Outcome::Processed),
                (keyed("k", 1), Outcome::Processed),
                (keyed("k", 1), Outcome::Duplicate),
                (keyed("j", 1), Outcome::Processed),
                (keyed("k", 2), Outcome::Processed),
                (keyed("k", 5), Outcome::Processed),
                (keyed("k", 2), Outcome::Duplicate),
                (keyed("k", 3), Outcome::Processed),
                (keyed("m", 1), Outcome::Processed),
                (keyed("k", 3), Outcome::Duplicate),
                (unkeyed(), Outcome::Processed),
                (keyed("k", 4), Outcome::Processed),
                (first.clone(), Outcome::Duplicate),
                (keyed("n", 2), Outcome::Processed),
                (keyed("k", 6), Outcome::Processed),
            ];
            process_steps(&inbox, &one, &handler, &steps).await;
            assert_eq!(key_seq(&pool, &c, "k").await, Some(6));
            assert_eq!(gaps(&pool, &c, "k").await, []);
            assert_eq!(gaps(&pool, &c, "n").await, [(1, 1)]);
            assert_eq!(effects(&pool).await, 12);
        }

        #[tokio::test]
        async fn keyed_duplicates_are_told_by_seq_including_older_ones_with_new_ids() {
            let (pool, _, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            deliver_each(&inbox, &pool, &handler, "k", 1..=3, Outcome::Processed).await;
            // Redelivered with the same seq, or an older seq arriving out of order: even under a new id.
            deliver_each(&inbox, &pool, &handler, "k", [3, 2, 1], Outcome::Duplicate).await;
            assert_eq!(effects(&pool).await, 3);
            // Another key, and the same key for another consumer, are independent.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "other", 1).await,
                Outcome::Processed
            );
            let other = Inbox::new(consumer());
            assert_eq!(deliver(&other, &pool, &handler, "k", 1).await, Outcome::Processed);
            assert_eq!(effects(&pool).await, 5);
        }

        #[tokio::test]
        async fn keys_and_consumers_are_compared_byte_for_byte() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            // Case, trailing spaces and accents make different keys (no collation), and a key of any
            // length is a key.
            let long: &'static str = Box::leak("k".repeat(10_000).into_boxed_str());
            let keys = ["k", "K", "k ", "é", "e", long, "ключ"];
            for key in keys {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, key, 1).await,
                    Outcome::Processed,
                    "{key:?}"
                );
            }
            for key in keys {
                assert_eq!(
                    deliver(&inbox, &pool, &handler, key, 1).await,
                    Outcome::Duplicate,
                    "{key:?}"
                );
            }
            assert_eq!(key_rows(&pool, &c).await, keys.len() as i64);
            // Their gaps are found again.
            for key in [long, "ключ"] {
                assert_eq!(deliver(&inbox, &pool, &handler, key, 3).await, Outcome::Processed);
                assert_eq!(deliver(&inbox, &pool, &handler, key, 2).await, Outcome::Processed);
                assert_eq!(deliver(&inbox, &pool, &handler, key, 2).await, Outcome::Duplicate);
            }
            // Consumer names too.
            let upper = Inbox::new(c.to_uppercase());
            let spaced = Inbox::new(format!("{c} "));
            for other in [&upper, &spaced] {
                assert_eq!(deliver(other, &pool, &handler, "k", 1).await, Outcome::Processed);
            }
            let msg = unkeyed();
            for other in [&inbox, &upper, &spaced] {
                assert_eq!(
                    other.process(&pool, &msg, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }
            assert_eq!(effects(&pool).await, keys.len() as i64 + 2 * 2 + 2 + 3);
        }
    };
}
