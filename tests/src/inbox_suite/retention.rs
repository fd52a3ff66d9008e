//! Retention: cleanup deletes expired records in batches, and an open gap stays until filled.

/// The retention scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_retention {
    () => {
        #[tokio::test]
        async fn a_gap_stays_open_until_filled_whatever_the_retention_and_the_cleanup() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            let inbox = inbox.retention(Duration::from_millis(1));
            let handler = Effect::default();
            for (key, seqs) in [("old", [1, 5]), ("split", [1, 10])] {
                for seq in seqs {
                    assert_eq!(
                        deliver(&inbox, &pool, &handler, key, seq).await,
                        Outcome::Processed
                    );
                }
            }
            // "split" is split by a late message before the cleanup.
            assert_eq!(
                deliver(&inbox, &pool, &handler, "split", 5).await,
                Outcome::Processed
            );
            let msg = unkeyed();
            assert_eq!(
                inbox.process(&pool, &msg, &handler).await.unwrap(),
                Outcome::Processed
            );
            // Far past the window (the rows are two days old; the window is 1 ms).
            age(
                &pool,
                "outbox_inbox_gaps",
                "created_at",
                &format!("consumer = '{c}'"),
            )
            .await;
            age(
                &pool,
                "outbox_inbox_messages",
                "processed_at",
                &format!("consumer = '{c}'"),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;

            // Only the unkeyed record goes: the open gaps are kept until filled.
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 1);
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 0);
            assert_eq!(gaps(&pool, &c, "old").await, [(2, 4)]);
            assert_eq!(gaps(&pool, &c, "split").await, [(2, 4), (6, 9)]);
            // A skipped message arriving now (a dead letter replayed a week later) is processed,
            // once.
            for (key, seq) in [("old", 3), ("split", 2), ("split", 9)] {
                let late = keyed(key, seq);
                assert_eq!(
                    inbox.process(&pool, &late, &handler).await.unwrap(),
                    Outcome::Processed,
                    "{key} {seq}"
                );
                assert_eq!(
                    inbox.process(&pool, &late, &handler).await.unwrap(),
                    Outcome::Duplicate,
                    "{key} {seq}"
                );
            }
            assert_eq!(gaps(&pool, &c, "old").await, [(2, 2), (4, 4)]);
            assert_eq!(gaps(&pool, &c, "split").await, [(3, 4), (6, 8)]);
            assert_eq!(inbox.cleanup(&pool, 2).await.unwrap(), 0);
            assert_eq!(gaps(&pool, &c, "old").await, [(2, 2), (4, 4)]);
            assert_eq!(effects(&pool).await, 2 + 3 + 1 + 3);
        }

        #[tokio::test]
        async fn cleanup_deletes_expired_unkeyed_records_in_batches_and_keeps_the_rest() {
            let (pool, c, inbox) = inbox_on_fresh_pool(GapPolicy::Accept).await;
            let inbox = inbox.retention(Duration::from_secs(24 * 60 * 60));
            let other = Inbox::new(consumer());
            let handler = Effect::default();
            let old: Vec<_> = (0..7).map(|_| unkeyed()).collect();
            let recent: Vec<_> = (0..2).map(|_| unkeyed()).collect();
            for m in &old {
                assert_eq!(
                    inbox.process(&pool, m, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Processed);
            assert_eq!(
                other.process(&pool, &old[0], &handler).await.unwrap(),
                Outcome::Processed
            );
            // Everything so far is two days old (the other consumer's record and the key too).
            age(&pool, "outbox_inbox_messages", "processed_at", "1 = 1").await;
            age(&pool, "outbox_inbox_keys", "updated_at", "1 = 1").await;
            for m in &recent {
                assert_eq!(
                    inbox.process(&pool, m, &handler).await.unwrap(),
                    Outcome::Processed
                );
            }

            // 7 expired rows by batches of 3: 3 + 3 + 1.
            assert_eq!(inbox.cleanup(&pool, 3).await.unwrap(), 7);
            assert_eq!(inbox.cleanup(&pool, 3).await.unwrap(), 0);
            assert_eq!(id_rows(&pool, &c).await, 2);
            for m in &recent {
                assert_eq!(
                    inbox.process(&pool, m, &handler).await.unwrap(),
                    Outcome::Duplicate
                );
            }
            // Past the window an unkeyed duplicate is no longer recognised; a keyed one always is.
            assert_eq!(
                inbox.process(&pool, &old[1], &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(deliver(&inbox, &pool, &handler, "k", 1).await, Outcome::Duplicate);
            assert_eq!(key_seq(&pool, &c, "k").await, Some(1));
            // Another consumer's rows are its own business (its window is 7 days).
            assert_eq!(id_rows(&pool, other.consumer()).await, 1);
            assert_eq!(other.cleanup(&pool, 100).await.unwrap(), 0);
        }
    };
}
