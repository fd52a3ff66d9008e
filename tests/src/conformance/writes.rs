//! The write side of the conformance suite: what a transaction enqueues commits or rolls back with
//! it, seqs are dense per key in commit order, a late commit is still claimed, bad input writes nothing.

/// The write scenarios of [`conformance_suite!`](crate::conformance_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_writes {
    () => {
        #[tokio::test]
        async fn rollback_leaves_nothing_commit_keeps_both() {
            let (pool, store) = fresh().await;
            let mut tx = pool.begin().await.unwrap();
            $crate::db::exec(&mut *tx, "INSERT INTO biz (id) VALUES (1)").await;
            outbox::enqueue(&mut tx, &Message::new("t", "rolled-back").key("k"))
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            assert_eq!(biz_rows(&pool).await, 0);
            assert_eq!(store.status().await.unwrap().pending, 0);

            let mut tx = pool.begin().await.unwrap();
            $crate::db::exec(&mut *tx, "INSERT INTO biz (id) VALUES (1)").await;
            let e = outbox::enqueue(&mut tx, &Message::new("t", "kept").key("k"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            assert_eq!(biz_rows(&pool).await, 1);
            assert_eq!(store.status().await.unwrap().pending, 1);
            // The rolled-back enqueue did not consume a seq.
            assert_eq!(e.seq, Some(1));
            let leases = take_all(&*store, OWNER).await;
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].payload, b"kept");
            assert_eq!(rows[0].id, e.id);
            assert_eq!(rows[0].id.get_version_num(), 7);
        }

        #[tokio::test]
        async fn concurrent_writers_of_one_key_get_dense_seq_in_commit_order() {
            let (pool, store) = fresh().await;
            let mut tasks = Vec::new();
            for i in 0..32u64 {
                let pool = pool.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    let e = outbox::enqueue(&mut tx, &Message::new("t", i.to_string()).key("hot"))
                        .await
                        .unwrap();
                    let locked_at = Instant::now();
                    tokio::time::sleep(Duration::from_millis(i % 5)).await;
                    let commit_called = Instant::now();
                    tx.commit().await.unwrap();
                    (e.seq.unwrap(), locked_at, commit_called)
                }));
            }
            let mut got = Vec::new();
            for t in tasks {
                got.push(t.await.unwrap());
            }
            got.sort_by_key(|g| g.0);
            let seqs: Vec<i64> = got.iter().map(|g| g.0).collect();
            assert_eq!(seqs, (1..=32).collect::<Vec<_>>());
            // Writer k+1 got its seq only after writer k asked to commit: seq order is commit order.
            for w in got.windows(2) {
                assert!(
                    w[1].1 > w[0].2,
                    "seq {} was assigned before seq {} committed",
                    w[1].0,
                    w[0].0
                );
            }
            let leases = take_all(&*store, OWNER).await;
            let rows = claim_all(&*store, &leases).await;
            let claimed: Vec<i64> = rows.iter().map(|r| r.seq.unwrap()).collect();
            assert_eq!(claimed, (1..=32).collect::<Vec<_>>(), "claimed in seq order");
        }

        #[tokio::test]
        async fn batch_enqueue_assigns_consecutive_seqs_per_key() {
            let (pool, store) = fresh().await;
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "a0").key("a"))
                .await
                .unwrap();
            let msgs = vec![
                Message::new("t", "a1").key("a"),
                Message::new("t", "u1"),
                Message::new("t", "b1").key("b"),
                Message::new("t", "a2").key("a").header("h", "v"),
            ];
            let out = outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
            tx.commit().await.unwrap();
            let seqs: Vec<Option<i64>> = out.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, vec![Some(2), None, Some(1), Some(3)]);
            for (m, e) in msgs.iter().zip(&out) {
                assert_eq!(m.id(), e.id);
            }
            let leases = take_all(&*store, OWNER).await;
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(rows.len(), 5);
            assert_eq!(payloads(&rows, Some("a")), vec![&b"a0"[..], b"a1", b"a2"]);
            let a2 = rows.iter().find(|r| r.payload == b"a2").unwrap();
            assert_eq!(a2.headers, vec![("h".to_string(), "v".to_string())]);
        }

        #[tokio::test]
        async fn late_commit_with_lower_id_is_still_claimed() {
            let (pool, store, leases) = fresh_with_leases().await;
            // A message enqueued early (lower id) in a transaction that commits after later ones.
            // SQLite runs one write transaction at a time: `early` would hold the write lock from
            // its insert until its commit, so the later writers could not commit in between (they
            // wait, then fail with SQLITE_BUSY). A row never commits after a row inserted after it
            // there. What still happens is a message created early (lower id) and committed late:
            // that is checked instead.
            let low = Message::new("t", "late");
            let early = if SINGLE_WRITER {
                None
            } else {
                let mut early = pool.begin().await.unwrap();
                outbox::enqueue(&mut early, &low).await.unwrap();
                Some(early)
            };
            for i in 0..5 {
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue(&mut tx, &Message::new("t", format!("m{i}")))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(rows.len(), 5);
            assert!(rows.iter().all(|r| r.id > low.id()));
            for l in &leases {
                let mine: Vec<_> = rows.iter().filter(|r| r.lane == l.lane).cloned().collect();
                store.mark_published(l, &delivered(&mine)).await.unwrap();
            }
            match early {
                Some(early) => early.commit().await.unwrap(),
                None => {
                    let mut late = pool.begin().await.unwrap();
                    outbox::enqueue(&mut late, &low).await.unwrap();
                    late.commit().await.unwrap();
                }
            }
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(rows.len(), 1, "the late-committed row must be claimed");
            assert_eq!(rows[0].id, low.id());
        }

        #[tokio::test]
        async fn bad_input_is_rejected_and_writes_nothing() {
            let (pool, store) = fresh().await;
            let mut tx = pool.begin().await.unwrap();
            let bad = [
                Message::new("", "x"),
                Message::new("a".repeat(250), "x"),
                Message::new("orders/placed", "x"),
                Message::new("t", vec![0u8; outbox::DEFAULT_MAX_PAYLOAD + 1]),
                Message::new("t", "x").header("outbox-seq", "1"),
                Message::new("t", "x").key(""),
                // PostgreSQL's text cannot hold it: refused there as a database error that
                // aborted the caller's transaction; the others stored it.
                Message::new("t", "x").key("a\0b"),
            ];
            for m in &bad {
                let err = outbox::enqueue(&mut tx, m).await.unwrap_err();
                assert!(err.is_bad_input(), "{err}");
                assert!(!err.is_retryable());
                assert!(!err.to_string().is_empty());
            }
            // A batch with one bad message writes none of them.
            let batch = vec![Message::new("t", "ok"), Message::new("bad topic", "x")];
            assert!(matches!(
                outbox::enqueue_batch(&mut tx, &batch).await,
                Err(Error::InvalidTopic { .. })
            ));
            // One message twice in a batch (a clone keeps the id): the broker's duplicate window
            // (NATS) and the consumers' inbox would drop the second copy as a duplicate.
            let twice = Message::new("t", "x").key("k");
            let err = outbox::enqueue_batch(&mut tx, &[twice.clone(), twice.clone()])
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::DuplicateId(id) if id == twice.id()) && err.is_bad_input(),
                "{err}"
            );
            // Serialization failure: a map with non-string keys cannot be JSON.
            let mut m = std::collections::HashMap::new();
            m.insert(vec![1u8], 1);
            assert!(matches!(Message::json("t", &m), Err(Error::Serialize(_))));
            let small = outbox::Outbox::new().max_payload(4);
            assert!(matches!(
                small.enqueue(&mut tx, &Message::new("t", "12345")).await,
                Err(Error::PayloadTooLarge { size: 5, max: 4 })
            ));
            // The transaction is still usable after the rejections.
            outbox::enqueue(&mut tx, &Message::new("t", "fine"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            assert_eq!(store.status().await.unwrap().pending, 1);
        }

        #[tokio::test]
        async fn the_probe_commits_and_answers_both_counts_or_neither() {
            let (_pool, store) = fresh().await;
            let counts = store.probe().await.unwrap();
            assert_eq!(counts.finished.is_some(), counts.writes.is_some(), "{counts:?}");
        }
    };
}
