//! The relay side of the conformance suite: leases keep two relays apart and stale epochs out,
//! delayed and failed rows hold their key, claims ahead keep key order, dead letters, lease renewal.

/// The lease and claim scenarios of [`conformance_suite!`](crate::conformance_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_claims {
    () => {
        #[tokio::test]
        async fn two_lease_holders_never_claim_the_same_row() {
            let (pool, store) = fresh().await;
            let half = (outbox::LANES / 2) as usize;
            let a = store
                .acquire("relay-a", half, Duration::from_secs(60))
                .await
                .unwrap();
            let b = store
                .acquire("relay-b", 64, Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(a.len(), half);
            assert_eq!(
                b.len(),
                outbox::LANES as usize - half,
                "b gets only the free lanes"
            );
            assert!(a.iter().all(|x| b.iter().all(|y| y.lane != x.lane)));
            let msgs: Vec<Message> = (0..400)
                .map(|i| Message::new("t", format!("{i}")).key(format!("k{}", i % 37)))
                .collect();
            $crate::db::commit_batch(&pool, &msgs).await;
            let (sa, sb) = (store.clone(), store.clone());
            let (ra, rb) = tokio::join!(async move { claim_all(&*sa, &a).await }, async move {
                claim_all(&*sb, &b).await
            });
            let mut ids: Vec<_> = ra.iter().chain(rb.iter()).map(|r| r.id).collect();
            assert!(!ra.is_empty() && !rb.is_empty());
            ids.sort();
            ids.dedup();
            assert_eq!(
                ids.len(),
                400,
                "every row claimed exactly once across the two holders"
            );
            assert_eq!(ra.len() + rb.len(), 400);
            // Someone else cannot take a held lane.
            assert!(store
                .acquire("relay-c", 64, Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty());
        }

        #[tokio::test]
        async fn stale_epoch_cannot_mark_fail_or_dead_letter() {
            let (pool, store) = fresh().await;
            let e = commit_each(&pool, [Message::new("t", "x").key("k")])
                .await
                .remove(0);
            let old = store
                .acquire("old", 64, Duration::from_millis(300))
                .await
                .unwrap();
            let old = lease_of(&old, e.lane).clone();
            let rows = store.claim(&old, 10, &[]).await.unwrap();
            assert_eq!(rows.len(), 1);
            // The old lease lapses after 300 ms (by the database's clock): take the lane over as
            // soon as it is free.
            let deadline = Instant::now() + Duration::from_secs(10);
            let new = loop {
                let got = store.acquire("new", 64, Duration::from_secs(60)).await.unwrap();
                if let Some(l) = got.iter().find(|l| l.lane == e.lane) {
                    break l.clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "the expired lease was never free to take"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(new.epoch > old.epoch);
            let d = delivered(&rows);
            assert!(matches!(
                store.mark_published(&old, &d).await,
                Err(Error::StaleLease { .. })
            ));
            assert!(matches!(
                store.mark_failed(&old, rows[0].pos, "boom", Duration::ZERO).await,
                Err(Error::StaleLease { .. })
            ));
            assert!(matches!(
                store.dead_letter(&old, rows[0].pos, "boom", true).await,
                Err(Error::StaleLease { .. })
            ));
            assert!(
                store.claim(&old, 10, &[]).await.unwrap().is_empty(),
                "a stale lease claims nothing"
            );
            assert!(store
                .renew("old", Duration::from_secs(1))
                .await
                .unwrap()
                .iter()
                .all(|l| l.lane != e.lane));
            let again = store.claim(&new, 10, &[]).await.unwrap();
            assert_eq!(again.len(), 1, "the row is untouched by the stale owner");
            assert_eq!(again[0].attempts, 0);
            store.mark_published(&new, &delivered(&again)).await.unwrap();
            assert_eq!(store.status().await.unwrap().pending, 0);
        }

        #[tokio::test]
        async fn delayed_message_is_not_claimed_early_and_holds_its_key() {
            let (pool, store, leases) = fresh_with_leases().await;
            commit_each(
                &pool,
                [
                    Message::new("t", "d1").key("k").delay(Duration::from_secs(2)),
                    Message::new("t", "d2").key("k"),
                    Message::new("t", "other").key("other"),
                ],
            )
            .await;
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(
                payloads(&rows, None),
                vec![&b"other"[..]],
                "delayed row and the key's later row wait"
            );
            // Due after 2 s: claimed as soon as it is, never before (checked above).
            let due = |rows: &[outbox::StoredMessage]| rows.iter().any(|r| r.key.as_deref() == Some("k"));
            let rows = claim_until(&*store, &leases, due, "the delayed row never became due").await;
            assert_eq!(payloads(&rows, Some("k")), vec![&b"d1"[..], b"d2"]);
        }

        #[tokio::test]
        async fn failed_row_backs_off_and_holds_later_rows_of_its_key() {
            let (pool, store, leases) = fresh_with_leases().await;
            let e = commit_each(
                &pool,
                [Message::new("t", "k1").key("k"), Message::new("t", "k2").key("k")],
            )
            .await;
            let lease = lease_of(&leases, e[0].lane);
            let rows = store.claim(lease, 10, &[]).await.unwrap();
            assert_eq!(rows.len(), 2);
            store
                .mark_failed(lease, rows[0].pos, "broker down", Duration::from_millis(1500))
                .await
                .unwrap();
            assert!(
                store.claim(lease, 10, &[]).await.unwrap().is_empty(),
                "k2 must wait behind k1"
            );
            // Both come back once the backoff (1.5 s) is over.
            let rows = claim_until(
                &*store,
                std::slice::from_ref(lease),
                |rows| !rows.is_empty(),
                "the backoff never ended",
            )
            .await;
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].attempts, 1);
            assert_eq!(rows[0].seq, Some(1));
        }

        #[tokio::test]
        async fn any_broker_error_text_is_stored_so_no_lane_waits_on_it() {
            let (pool, store, leases) = fresh_with_leases().await;
            let e = commit_each(
                &pool,
                [Message::new("t", "r").key("k1"), Message::new("t", "d").key("k2")],
            )
            .await;
            let rows = claim_all(&*store, &leases).await;
            let row = |payload: &[u8]| rows.iter().find(|r| r.payload == payload).unwrap();
            // A NUL (PostgreSQL's text refuses it) and a text far longer than any error needs.
            let error = format!("broker said \0 no{}", "x".repeat(100_000));
            store
                .mark_failed(
                    lease_of(&leases, e[0].lane),
                    row(b"r").pos,
                    &error,
                    Duration::ZERO,
                )
                .await
                .expect("a retry is stored whatever the error says");
            store
                .dead_letter(lease_of(&leases, e[1].lane), row(b"d").pos, &error, false)
                .await
                .expect("a dead letter is stored whatever the error says");
            let dl = store.dead_letters(10).await.unwrap();
            assert_eq!(dl.len(), 1);
            assert!(
                dl[0].error.starts_with("broker said \u{fffd} no"),
                "{:?}",
                &dl[0].error[..20]
            );
            assert!(dl[0].error.len() < 10_000, "{} bytes", dl[0].error.len());
            let again = claim_all(&*store, &leases).await;
            assert_eq!(payloads(&again, None), vec![&b"r"[..]]);
            assert_eq!(again[0].attempts, 1);
        }

        #[tokio::test]
        async fn claim_ahead_leaves_out_the_batch_in_flight_and_keeps_key_order() {
            let (pool, store, leases) = fresh_with_leases().await;
            let e = commit_each(&pool, (0..6).map(|i| Message::new("t", format!("m{i}")).key("k"))).await;
            let lease = lease_of(&leases, e[0].lane);
            let first = store.claim(lease, 4, &[]).await.unwrap();
            let in_flight: Vec<i64> = first.iter().map(|r| r.pos).collect();
            let ahead = store.claim(lease, 4, &in_flight).await.unwrap();
            let seqs = |rows: &[outbox::StoredMessage]| rows.iter().map(|r| r.seq.unwrap()).collect::<Vec<_>>();
            assert_eq!(seqs(&first), vec![1, 2, 3, 4]);
            assert_eq!(
                seqs(&ahead),
                vec![5, 6],
                "the rows after the batch in flight, in order"
            );
            // Leaving out positions that are not there changes nothing.
            let all = store.claim(lease, 10, &[i64::MAX, -1]).await.unwrap();
            assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5, 6]);
            // Once the first row fails, the rows claimed ahead of it are no longer claimable.
            store
                .mark_failed(lease, first[0].pos, "broker down", Duration::from_secs(60))
                .await
                .unwrap();
            assert!(store.claim(lease, 10, &in_flight[1..]).await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn dead_letters_park_or_skip_and_can_be_retried_or_discarded() {
            let (pool, store, leases) = fresh_with_leases().await;
            let e = commit_each(
                &pool,
                [
                    Message::new("t", "p1").key("parked"),
                    Message::new("t", "p2").key("parked"),
                    Message::new("t", "s1").key("skipped"),
                    Message::new("t", "s2").key("skipped"),
                ],
            )
            .await;
            let (p, s) = (&e[0], &e[2]);
            let (lp, ls) = (lease_of(&leases, p.lane), lease_of(&leases, s.lane));
            let rows = claim_all(&*store, &leases).await;
            let pos_of = |payload: &[u8]| rows.iter().find(|r| r.payload == payload).unwrap().pos;
            store
                .dead_letter(lp, pos_of(b"p1"), "too large", true)
                .await
                .unwrap();
            store
                .dead_letter(ls, pos_of(b"s1"), "too large", false)
                .await
                .unwrap();
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(
                payloads(&rows, None),
                vec![&b"s2"[..]],
                "a parked key waits, a skipped key moves on"
            );
            let dl = store.dead_letters(10).await.unwrap();
            assert_eq!(dl.len(), 2);
            assert_eq!(store.status().await.unwrap().dead_letters, 2);
            let parked = dl.iter().find(|d| d.parked).unwrap();
            assert_eq!(
                (parked.id, parked.error.as_str(), parked.attempts),
                (p.id, "too large", 1)
            );
            assert!(store.retry_dead_letter(p.id).await.unwrap());
            assert!(!store.retry_dead_letter(p.id).await.unwrap());
            let rows = store.claim(lp, 10, &[]).await.unwrap();
            assert_eq!(
                payloads(&rows, None),
                vec![&b"p1"[..], b"p2"],
                "retried row goes first, in seq order"
            );
            assert!(store.discard_dead_letter(s.id).await.unwrap());
            assert_eq!(store.status().await.unwrap().dead_letters, 0);
        }

        #[tokio::test]
        async fn leases_renew_release_and_count_owners() {
            let (_pool, store) = fresh().await;
            let a = store.acquire("a", 4, Duration::from_secs(60)).await.unwrap();
            store.acquire("b", 4, Duration::from_secs(60)).await.unwrap();
            // Renewal is the heartbeat that makes a relay count as live, lanes or not.
            store.renew("b", Duration::from_secs(60)).await.unwrap();
            store.renew("idle", Duration::from_secs(60)).await.unwrap();
            let renewed = store.renew("a", Duration::from_secs(60)).await.unwrap();
            assert_eq!(store.live_owners().await.unwrap(), 3);
            assert_eq!(renewed.len(), 4);
            assert!(renewed.iter().all(|l| a.contains(l)), "renewal keeps epochs");
            for l in &a {
                store.release(l).await.unwrap();
            }
            assert!(store
                .renew("a", Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty());
            store.leave("a").await.unwrap();
            store.leave("idle").await.unwrap();
            assert_eq!(store.live_owners().await.unwrap(), 1);
            store.renew("short", Duration::from_millis(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                store.live_owners().await.unwrap(),
                1,
                "an expired heartbeat does not count"
            );
            let c = store.acquire("c", 4, Duration::from_secs(60)).await.unwrap();
            assert_eq!(c.len(), 4);
            let status = store.status().await.unwrap();
            assert_eq!(status.lanes.len(), outbox::LANES as usize);
            assert_eq!(
                status
                    .lanes
                    .iter()
                    .filter(|l| l.owner.as_deref() == Some("c"))
                    .count(),
                4
            );
        }
    };
}
