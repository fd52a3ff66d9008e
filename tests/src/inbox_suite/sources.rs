//! Sources: the same key from two outboxes is applied once per outbox, and seqs of other topics are
//! not counted under `Expect`.

/// The source scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_sources {
    () => {
        #[tokio::test]
        async fn the_same_key_from_two_outboxes_is_applied_once_per_outbox() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            // Two services, each with its own outbox database, both enqueue key "order-42".
            let (a, b) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
            let ids: Vec<String> = (0..4).map(|_| Uuid::now_v7().to_string()).collect();
            let seq_text = ["1", "2"];
            let msgs: Vec<Incoming<'_>> = [(&a, 0), (&b, 0), (&b, 1), (&a, 1)]
                .iter()
                .enumerate()
                .map(|(i, (source, s))| {
                    Incoming::from_headers(
                        "orders",
                        b"{}",
                        [
                            ("outbox-id", ids[i].as_bytes()),
                            ("outbox-key", &b"order-42"[..]),
                            ("outbox-seq", seq_text[*s].as_bytes()),
                            ("outbox-source", source.as_bytes()),
                        ],
                    )
                    .unwrap()
                })
                .collect();
            for msg in &msgs {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Processed,
                    "{msg:?}"
                );
            }
            for msg in &msgs {
                assert_eq!(
                    inbox.process(&pool, msg, &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "{msg:?}"
                );
            }
            assert_eq!(effects(&pool).await, 4);
            // Neither outbox's numbering looked like a gap in the other's.
            assert_eq!(counter("outbox_inbox_gaps_total", &c), 0);
        }

        #[tokio::test]
        async fn the_claim_carries_the_outbox_databases_source_and_two_outboxes_stay_apart() {
            let (pool, _, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            // Two outbox databases, each with its own source id, both enqueue key "order-42".
            let mut sources = Vec::new();
            let mut claimed = Vec::new();
            for _ in 0..2 {
                let outbox_db = migrated().await;
                let source: String = sqlx::query_scalar("SELECT id FROM outbox_source")
                    .fetch_one(&outbox_db)
                    .await
                    .unwrap();
                assert!(!source.is_empty());
                let mut tx = outbox_db.begin().await.unwrap();
                for n in 1..=2 {
                    let msg = outbox::Message::new("orders", format!("{n}")).key("order-42");
                    outbox::enqueue(&mut tx, &msg).await.unwrap();
                }
                tx.commit().await.unwrap();
                let store = <Db as Dialect>::store(outbox_db);
                let leases = store
                    .acquire("suite", outbox::LANES as usize, Duration::from_secs(30))
                    .await
                    .unwrap();
                let lane = outbox::lane_of(Some("order-42"), Uuid::nil(), outbox::LANES);
                let lease = leases.iter().find(|l| l.lane == lane).unwrap();
                let rows = store.claim(lease, 10, &[]).await.unwrap();
                assert_eq!(rows.len(), 2);
                for row in &rows {
                    assert_eq!(row.source.as_deref(), Some(source.as_str()));
                }
                sources.push(source);
                claimed.extend(rows);
            }
            assert_ne!(sources[0], sources[1]);
            // Delivered with the headers the publisher sends: every message applies once.
            for expected in [Outcome::Processed, Outcome::Duplicate] {
                for row in &claimed {
                    let (id, seq) = (row.id.to_string(), row.seq.unwrap().to_string());
                    let headers = [
                        (outbox::HEADER_ID, id.as_bytes()),
                        (outbox::HEADER_KEY, row.key.as_deref().unwrap().as_bytes()),
                        (outbox::HEADER_SEQ, seq.as_bytes()),
                        (outbox::HEADER_SOURCE, row.source.as_deref().unwrap().as_bytes()),
                    ];
                    let msg = Incoming::from_headers("orders", &row.payload, headers).unwrap();
                    assert_eq!(msg.source, row.source.as_deref());
                    assert_eq!(
                        inbox.process(&pool, &msg, &handler).await.unwrap(),
                        expected,
                        "{row:?}"
                    );
                }
            }
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn a_gap_of_one_outbox_filled_in_its_middle_keeps_the_seqs_above_new() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Effect>(GapPolicy::Accept).await;
            let source = Uuid::new_v4().to_string();
            let sourced = |seq: i64| keyed("k", seq).source(source.as_str());
            // 2..=5 are skipped; 3 arrives first, cutting the gap in two: 2 below it, 4..=5 above.
            for seq in [1, 6, 3, 5, 2, 4] {
                assert_eq!(
                    inbox.process(&pool, &sourced(seq), &handler).await.unwrap(),
                    Outcome::Processed,
                    "seq {seq}"
                );
            }
            for seq in 1..=6 {
                assert_eq!(
                    inbox.process(&pool, &sourced(seq), &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "seq {seq}"
                );
            }
            assert_eq!(effects(&pool).await, 6);
            // No piece of the gap was left behind, under this source or the default one.
            assert_eq!(gaps(&pool, &c, "k").await, []);
        }

        #[tokio::test]
        async fn under_expect_seqs_of_other_topics_are_not_counted_and_a_late_one_still_applies() {
            let pool = pool().await;
            let handler = Effect::default();
            // Key "k": 1 and 3 are sent to "orders", 2 to "invoices", which these consumers do not
            // read; 4 to "orders" is delivered late.
            let msgs = [keyed("k", 1), keyed("k", 3), keyed("k", 5), keyed("k", 4)];
            for (policy, gaps_counted) in [(GapPolicy::Expect, 0), (GapPolicy::Accept, 2)] {
                let c = consumer();
                let inbox = Inbox::new(&c).gap_policy(policy);
                for msg in &msgs {
                    process_twice(&inbox, &pool, msg, &handler).await;
                }
                assert_eq!(counter("outbox_inbox_gaps_total", &c), gaps_counted, "{policy:?}");
                assert_eq!(counter("outbox_inbox_gap_fills_total", &c), 1, "{policy:?}");
                // The seq sent elsewhere stays an open gap: if it ever reaches this consumer, it
                // applies.
                assert_eq!(gaps(&pool, &c, "k").await, [(2, 2)], "{policy:?}");
                assert_eq!(key_seq(&pool, &c, "k").await, Some(5));
            }
            assert_eq!(effects(&pool).await, 2 * 4);
        }
    };
}
