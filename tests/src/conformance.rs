//! The conformance suite every `Store` backend passes. `conformance_suite!(Db, fresh)` expands to one
//! `#[tokio::test]` per guarantee, where `fresh()` returns a new migrated `(Pool<Db>, Arc<dyn Store>)`.
//! `conformance_suite!(Db, fresh, single_writer)` is for databases with one write transaction at a
//! time (SQLite), where one scenario cannot be staged as written (see
//! `late_commit_with_lower_id_is_still_claimed`).
//! Statements in the suite are written in the SQL all backends share (no bind placeholders).

use std::time::Duration;

use outbox::{Lease, Store, LANES};

/// Owner name used by suite tests.
pub const OWNER: &str = "suite-owner";

/// Takes every lane for `owner` (fresh database: all lanes are free).
pub async fn take_all(store: &dyn Store, owner: &str) -> Vec<Lease> {
    let leases = store
        .acquire(owner, LANES as usize, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(leases.len(), LANES as usize, "a fresh database has every lane free");
    leases
}

/// The lease of `lane` among `leases`.
pub fn lease_of(leases: &[Lease], lane: i32) -> &Lease {
    leases.iter().find(|l| l.lane == lane).expect("lease for lane")
}

/// Claims every lane once and returns all rows.
pub async fn claim_all(store: &dyn Store, leases: &[Lease]) -> Vec<outbox::StoredMessage> {
    let mut out = Vec::new();
    for l in leases {
        out.extend(store.claim(l, 10_000, &[]).await.unwrap());
    }
    out
}

#[macro_export]
macro_rules! conformance_suite {
    (@suite $db:ty, $fresh:expr, $single_writer:expr) => {
        /// One write transaction at a time (SQLite): `late_commit_with_lower_id_is_still_claimed`.
        const SINGLE_WRITER: bool = $single_writer;

        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use outbox::{Delivered, Error, Message, Store};
        use $crate::conformance::{claim_all, lease_of, take_all, OWNER};

        async fn fresh() -> (sqlx::Pool<$db>, Arc<dyn Store>) {
            let (pool, store) = $fresh.await;
            sqlx::raw_sql("CREATE TABLE biz (id BIGINT PRIMARY KEY)").execute(&pool).await.unwrap();
            (pool, store)
        }

        async fn biz_rows(pool: &sqlx::Pool<$db>) -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM biz").fetch_one(pool).await.unwrap()
        }

        fn delivered(rows: &[outbox::StoredMessage]) -> Vec<Delivered> {
            rows.iter().map(|r| Delivered::new(r.pos).at(0, 0)).collect()
        }

        #[tokio::test]
        async fn rollback_leaves_nothing_commit_keeps_both() {
            let (pool, store) = fresh().await;
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO biz (id) VALUES (1)").execute(&mut *tx).await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "rolled-back").key("k")).await.unwrap();
            tx.rollback().await.unwrap();
            assert_eq!(biz_rows(&pool).await, 0);
            assert_eq!(store.status().await.unwrap().pending, 0);

            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO biz (id) VALUES (1)").execute(&mut *tx).await.unwrap();
            let e = outbox::enqueue(&mut tx, &Message::new("t", "kept").key("k")).await.unwrap();
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
                assert!(w[1].1 > w[0].2, "seq {} was assigned before seq {} committed", w[1].0, w[0].0);
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
            outbox::enqueue(&mut tx, &Message::new("t", "a0").key("a")).await.unwrap();
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
            let a: Vec<&[u8]> =
                rows.iter().filter(|r| r.key.as_deref() == Some("a")).map(|r| r.payload.as_slice()).collect();
            assert_eq!(a, vec![&b"a0"[..], b"a1", b"a2"]);
            let a2 = rows.iter().find(|r| r.payload == b"a2").unwrap();
            assert_eq!(a2.headers, vec![("h".to_string(), "v".to_string())]);
        }

        #[tokio::test]
        async fn late_commit_with_lower_id_is_still_claimed() {
            let (pool, store) = fresh().await;
            let leases = take_all(&*store, OWNER).await;
            if SINGLE_WRITER {
                // SQLite runs one write transaction at a time: `early` would hold the write lock
                // from its insert until its commit, so the later writers could not commit in
                // between (they wait, then fail with SQLITE_BUSY). A row never commits after a row
                // inserted after it there. What still happens is a message created early (lower
                // id) and committed late: that is checked instead.
                let low = Message::new("t", "late");
                for i in 0..5 {
                    let mut tx = pool.begin().await.unwrap();
                    outbox::enqueue(&mut tx, &Message::new("t", format!("m{i}"))).await.unwrap();
                    tx.commit().await.unwrap();
                }
                let rows = claim_all(&*store, &leases).await;
                assert_eq!(rows.len(), 5);
                assert!(rows.iter().all(|r| r.id > low.id()));
                for l in &leases {
                    let mine: Vec<_> = rows.iter().filter(|r| r.lane == l.lane).cloned().collect();
                    store.mark_published(l, &delivered(&mine)).await.unwrap();
                }
                let mut late = pool.begin().await.unwrap();
                outbox::enqueue(&mut late, &low).await.unwrap();
                late.commit().await.unwrap();
                let rows = claim_all(&*store, &leases).await;
                assert_eq!(rows.len(), 1, "the late-committed row must be claimed");
                assert_eq!(rows[0].id, low.id());
                return;
            }
            let mut early = pool.begin().await.unwrap();
            let low = outbox::enqueue(&mut early, &Message::new("t", "late")).await.unwrap();
            for i in 0..5 {
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue(&mut tx, &Message::new("t", format!("m{i}"))).await.unwrap();
                tx.commit().await.unwrap();
            }
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(rows.len(), 5);
            assert!(rows.iter().all(|r| r.id > low.id));
            for l in &leases {
                let mine: Vec<_> = rows.iter().filter(|r| r.lane == l.lane).cloned().collect();
                store.mark_published(l, &delivered(&mine)).await.unwrap();
            }
            early.commit().await.unwrap();
            let rows = claim_all(&*store, &leases).await;
            assert_eq!(rows.len(), 1, "the late-committed row must be claimed");
            assert_eq!(rows[0].id, low.id);
        }

        #[tokio::test]
        async fn two_lease_holders_never_claim_the_same_row() {
            let (pool, store) = fresh().await;
            let half = (outbox::LANES / 2) as usize;
            let a = store.acquire("relay-a", half, Duration::from_secs(60)).await.unwrap();
            let b = store.acquire("relay-b", 64, Duration::from_secs(60)).await.unwrap();
            assert_eq!(a.len(), half);
            assert_eq!(b.len(), outbox::LANES as usize - half, "b gets only the free lanes");
            assert!(a.iter().all(|x| b.iter().all(|y| y.lane != x.lane)));
            let mut tx = pool.begin().await.unwrap();
            let msgs: Vec<Message> =
                (0..400).map(|i| Message::new("t", format!("{i}")).key(format!("k{}", i % 37))).collect();
            outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
            tx.commit().await.unwrap();
            let (sa, sb) = (store.clone(), store.clone());
            let (ra, rb) = tokio::join!(
                async move { claim_all(&*sa, &a).await },
                async move { claim_all(&*sb, &b).await }
            );
            let mut ids: Vec<_> = ra.iter().chain(rb.iter()).map(|r| r.id).collect();
            assert!(!ra.is_empty() && !rb.is_empty());
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 400, "every row claimed exactly once across the two holders");
            assert_eq!(ra.len() + rb.len(), 400);
            // Someone else cannot take a held lane.
            assert!(store.acquire("relay-c", 64, Duration::from_secs(60)).await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn stale_epoch_cannot_mark_fail_or_dead_letter() {
            let (pool, store) = fresh().await;
            let mut tx = pool.begin().await.unwrap();
            let e = outbox::enqueue(&mut tx, &Message::new("t", "x").key("k")).await.unwrap();
            tx.commit().await.unwrap();
            let old = store.acquire("old", 64, Duration::from_millis(300)).await.unwrap();
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
                assert!(Instant::now() < deadline, "the expired lease was never free to take");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(new.epoch > old.epoch);
            let d = delivered(&rows);
            assert!(matches!(store.mark_published(&old, &d).await, Err(Error::StaleLease { .. })));
            assert!(matches!(
                store.mark_failed(&old, rows[0].pos, "boom", Duration::ZERO).await,
                Err(Error::StaleLease { .. })
            ));
            assert!(matches!(
                store.dead_letter(&old, rows[0].pos, "boom", true).await,
                Err(Error::StaleLease { .. })
            ));
            assert!(store.claim(&old, 10, &[]).await.unwrap().is_empty(), "a stale lease claims nothing");
            assert!(store.renew("old", Duration::from_secs(1)).await.unwrap().iter().all(|l| l.lane != e.lane));
            let again = store.claim(&new, 10, &[]).await.unwrap();
            assert_eq!(again.len(), 1, "the row is untouched by the stale owner");
            assert_eq!(again[0].attempts, 0);
            store.mark_published(&new, &delivered(&again)).await.unwrap();
            assert_eq!(store.status().await.unwrap().pending, 0);
        }

        #[tokio::test]
        async fn delayed_message_is_not_claimed_early_and_holds_its_key() {
            let (pool, store) = fresh().await;
            let leases = take_all(&*store, OWNER).await;
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "d1").key("k").delay(Duration::from_secs(2))).await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "d2").key("k")).await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "other").key("other")).await.unwrap();
            tx.commit().await.unwrap();
            let rows = claim_all(&*store, &leases).await;
            let got: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
            assert_eq!(got, vec![&b"other"[..]], "delayed row and the key's later row wait");
            // Due after 2 s: claimed as soon as it is, never before (checked above).
            let start = std::time::Instant::now();
            let rows = loop {
                let rows = claim_all(&*store, &leases).await;
                if rows.iter().any(|r| r.key.as_deref() == Some("k")) {
                    break rows;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "the delayed row never became due");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let got: Vec<&[u8]> =
                rows.iter().filter(|r| r.key.as_deref() == Some("k")).map(|r| r.payload.as_slice()).collect();
            assert_eq!(got, vec![&b"d1"[..], b"d2"]);
        }

        #[tokio::test]
        async fn failed_row_backs_off_and_holds_later_rows_of_its_key() {
            let (pool, store) = fresh().await;
            let leases = take_all(&*store, OWNER).await;
            let mut tx = pool.begin().await.unwrap();
            let e = outbox::enqueue(&mut tx, &Message::new("t", "k1").key("k")).await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "k2").key("k")).await.unwrap();
            tx.commit().await.unwrap();
            let lease = lease_of(&leases, e.lane);
            let rows = store.claim(lease, 10, &[]).await.unwrap();
            assert_eq!(rows.len(), 2);
            store.mark_failed(lease, rows[0].pos, "broker down", Duration::from_millis(1500)).await.unwrap();
            assert!(store.claim(lease, 10, &[]).await.unwrap().is_empty(), "k2 must wait behind k1");
            // Both come back once the backoff (1.5 s) is over.
            let start = std::time::Instant::now();
            let rows = loop {
                let rows = store.claim(lease, 10, &[]).await.unwrap();
                if !rows.is_empty() {
                    break rows;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "the backoff never ended");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].attempts, 1);
            assert_eq!(rows[0].seq, Some(1));
        }

        #[tokio::test]
        async fn claim_ahead_leaves_out_the_batch_in_flight_and_keeps_key_order() {
            let (pool, store) = fresh().await;
            let leases = take_all(&*store, OWNER).await;
            let mut tx = pool.begin().await.unwrap();
            let mut lane = None;
            for i in 0..6 {
                let e = outbox::enqueue(&mut tx, &Message::new("t", format!("m{i}")).key("k")).await.unwrap();
                lane = Some(e.lane);
            }
            tx.commit().await.unwrap();
            let lease = lease_of(&leases, lane.unwrap());
            let first = store.claim(lease, 4, &[]).await.unwrap();
            let in_flight: Vec<i64> = first.iter().map(|r| r.pos).collect();
            let ahead = store.claim(lease, 4, &in_flight).await.unwrap();
            let seqs = |rows: &[outbox::StoredMessage]| rows.iter().map(|r| r.seq.unwrap()).collect::<Vec<_>>();
            assert_eq!(seqs(&first), vec![1, 2, 3, 4]);
            assert_eq!(seqs(&ahead), vec![5, 6], "the rows after the batch in flight, in order");
            // Leaving out positions that are not there changes nothing.
            let all = store.claim(lease, 10, &[i64::MAX, -1]).await.unwrap();
            assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5, 6]);
            // Once the first row fails, the rows claimed ahead of it are no longer claimable.
            store.mark_failed(lease, first[0].pos, "broker down", Duration::from_secs(60)).await.unwrap();
            assert!(store.claim(lease, 10, &in_flight[1..]).await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn dead_letters_park_or_skip_and_can_be_retried_or_discarded() {
            let (pool, store) = fresh().await;
            let leases = take_all(&*store, OWNER).await;
            let mut tx = pool.begin().await.unwrap();
            let p = outbox::enqueue(&mut tx, &Message::new("t", "p1").key("parked")).await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "p2").key("parked")).await.unwrap();
            let s = outbox::enqueue(&mut tx, &Message::new("t", "s1").key("skipped")).await.unwrap();
            outbox::enqueue(&mut tx, &Message::new("t", "s2").key("skipped")).await.unwrap();
            tx.commit().await.unwrap();
            let (lp, ls) = (lease_of(&leases, p.lane), lease_of(&leases, s.lane));
            let rows = claim_all(&*store, &leases).await;
            let pos_of = |payload: &[u8]| rows.iter().find(|r| r.payload == payload).unwrap().pos;
            store.dead_letter(lp, pos_of(b"p1"), "too large", true).await.unwrap();
            store.dead_letter(ls, pos_of(b"s1"), "too large", false).await.unwrap();
            let rows = claim_all(&*store, &leases).await;
            let got: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
            assert_eq!(got, vec![&b"s2"[..]], "a parked key waits, a skipped key moves on");
            let dl = store.dead_letters(10).await.unwrap();
            assert_eq!(dl.len(), 2);
            assert_eq!(store.status().await.unwrap().dead_letters, 2);
            let parked = dl.iter().find(|d| d.parked).unwrap();
            assert_eq!((parked.id, parked.error.as_str(), parked.attempts), (p.id, "too large", 1));
            assert!(store.retry_dead_letter(p.id).await.unwrap());
            assert!(!store.retry_dead_letter(p.id).await.unwrap());
            let rows = store.claim(lp, 10, &[]).await.unwrap();
            let got: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
            assert_eq!(got, vec![&b"p1"[..], b"p2"], "retried row goes first, in seq order");
            assert!(store.discard_dead_letter(s.id).await.unwrap());
            assert_eq!(store.status().await.unwrap().dead_letters, 0);
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
            ];
            for m in &bad {
                let err = outbox::enqueue(&mut tx, m).await.unwrap_err();
                assert!(!err.is_retryable());
                assert!(!err.to_string().is_empty());
            }
            // A batch with one bad message writes none of them.
            let batch = vec![Message::new("t", "ok"), Message::new("bad topic", "x")];
            assert!(matches!(outbox::enqueue_batch(&mut tx, &batch).await, Err(Error::InvalidTopic { .. })));
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
            outbox::enqueue(&mut tx, &Message::new("t", "fine")).await.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(store.status().await.unwrap().pending, 1);
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
            assert!(store.renew("a", Duration::from_secs(60)).await.unwrap().is_empty());
            store.leave("a").await.unwrap();
            store.leave("idle").await.unwrap();
            assert_eq!(store.live_owners().await.unwrap(), 1);
            store.renew("short", Duration::from_millis(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(store.live_owners().await.unwrap(), 1, "an expired heartbeat does not count");
            let c = store.acquire("c", 4, Duration::from_secs(60)).await.unwrap();
            assert_eq!(c.len(), 4);
            let status = store.status().await.unwrap();
            assert_eq!(status.lanes.len(), outbox::LANES as usize);
            assert_eq!(status.lanes.iter().filter(|l| l.owner.as_deref() == Some("c")).count(), 4);
        }
    };
    ($db:ty, $fresh:expr, single_writer) => {
        $crate::conformance_suite!(@suite $db, $fresh, true);
    };
    ($db:ty, $fresh:expr) => {
        $crate::conformance_suite!(@suite $db, $fresh, false);
    };
}
