//! The upgrade to sources: records and parked messages written before the migration keep working.

/// The upgrade scenarios of [`inbox_suite!`](crate::inbox_suite!) (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_suite_upgrade {
    () => {
        #[tokio::test]
        async fn records_written_before_sources_keep_working_after_the_migration() {
            // A database migrated up to 0002 (the inbox without sources), with records in it.
            let pool = unmigrated().await;
            let blob = <Db as Dialect>::BLOB;
            sqlx::raw_sql(&format!(
                "CREATE TABLE outbox_schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
                 checksum {blob} NOT NULL, installed_on BIGINT)"
            ))
            .execute(&pool)
            .await
            .unwrap();
            let p = <Db as Dialect>::param;
            let record = format!(
                "INSERT INTO outbox_schema_migrations (version, description, checksum) VALUES ({}, {}, {})",
                p(1),
                p(2),
                p(3)
            );
            for m in <Db as Dialect>::MIGRATOR.iter().filter(|m| m.version <= 2) {
                sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
                sqlx::query(&record)
                    .bind(m.version)
                    .bind(&*m.description)
                    .bind(&*m.checksum)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            let c = consumer();
            let now = <Db as Dialect>::NOW;
            // Key "k" applied up to 2; key "g" up to 4 with 2..=3 skipped; one unkeyed message.
            for (key, seq, gap_from) in [("k", 2, "NULL"), ("g", 4, "2")] {
                let (cols, vals) = <Db as Dialect>::key_insert(key, false);
                sqlx::raw_sql(&format!(
                    "INSERT INTO outbox_inbox_keys (consumer, {cols}, seq, gap_from, updated_at) \
                     VALUES ('{c}', {vals}, {seq}, {gap_from}, {now})"
                ))
                .execute(&pool)
                .await
                .unwrap();
            }
            let (cols, vals) = <Db as Dialect>::key_insert("g", true);
            sqlx::raw_sql(&format!(
                "INSERT INTO outbox_inbox_gaps (consumer, {cols}, from_seq, to_seq, created_at) \
                 VALUES ('{c}', {vals}, 2, 3, {now})"
            ))
            .execute(&pool)
            .await
            .unwrap();
            let old = unkeyed();
            sqlx::query(&format!(
                "INSERT INTO outbox_inbox_messages (consumer, message_id, processed_at) VALUES ({}, {}, {now})",
                p(1),
                p(2)
            ))
            .bind(&c)
            .bind(old.id)
            .execute(&pool)
            .await
            .unwrap();

            <Db as Dialect>::migrate(&pool).await.unwrap();
            let versions: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM outbox_schema_migrations ORDER BY version")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            // 0003 and whatever came after it.
            let all: Vec<i64> = <Db as Dialect>::MIGRATOR.iter().map(|m| m.version).collect();
            assert_eq!(versions, all);
            assert_eq!(versions[..3], [1, 2, 3]);
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox_source")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert_eq!(ids.len(), 1);
            sqlx::raw_sql("CREATE TABLE effects (message_id VARCHAR(36) NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();

            let inbox = Inbox::new(&c);
            let handler = Effect::default();
            let source = Uuid::new_v4().to_string();
            let sourced = |key: &'static str, seq: i64| keyed(key, seq).source(source.as_str());
            let steps = [
                // Messages without a source (a relay that predates it) find their records as before.
                (keyed("k", 1), Outcome::Duplicate),
                (keyed("k", 2), Outcome::Duplicate),
                (keyed("k", 3), Outcome::Processed),
                (keyed("g", 3), Outcome::Processed),
                (keyed("g", 3), Outcome::Duplicate),
                (keyed("g", 4), Outcome::Duplicate),
                (old, Outcome::Duplicate),
                // The first message of a key with a source takes the key's records over: the
                // upgraded relay sending a message again is still recognised, and a gap still fills.
                (sourced("k", 3), Outcome::Duplicate),
                (sourced("k", 4), Outcome::Processed),
                (sourced("g", 2), Outcome::Processed),
                (sourced("g", 2), Outcome::Duplicate),
                (sourced("g", 3), Outcome::Duplicate),
            ];
            process_steps(&inbox, &pool, &handler, &steps).await;
            let default_rows = count(
                &pool,
                format!("SELECT COUNT(*) FROM outbox_inbox_keys WHERE consumer = '{c}' AND source = ''"),
            )
            .await;
            assert_eq!(default_rows, 0);
            assert_eq!(key_rows(&pool, &c).await, 2);
            assert_eq!(gaps(&pool, &c, "g").await, []);
            assert_eq!(effects(&pool).await, 4);
        }

        #[tokio::test]
        async fn a_parked_message_without_source_goes_over_with_its_key() {
            let (pool, c, inbox, handler) = inbox_and_handler::<Recorder>(GapPolicy::Hold).await;
            // Before the relay sent sources: 1 applied, 3 parked.
            let steps = [
                (keyed("k", 1), Outcome::Processed),
                (keyed("k", 3), Outcome::Parked),
            ];
            process_steps(&inbox, &pool, &handler, &steps).await;
            // 2 comes from the upgraded relay, with its source: 3 follows it.
            let source = Uuid::new_v4().to_string();
            let two = keyed("k", 2).source(&source);
            assert_eq!(
                inbox.process(&pool, &two, &handler).await.unwrap(),
                Outcome::Processed
            );
            assert_eq!(handler.order(), [1, 2, 3].map(|s| ("k".to_owned(), s)));
            assert_eq!(parked_rows(&pool, &c).await, 0);
            assert_eq!(key_rows(&pool, &c).await, 1);
            for seq in 1..=3 {
                let msg = keyed("k", seq).source(&source);
                assert_eq!(
                    inbox.process(&pool, &msg, &handler).await.unwrap(),
                    Outcome::Duplicate
                );
            }
            assert_eq!(effects(&pool).await, 3);
        }
    };
}
