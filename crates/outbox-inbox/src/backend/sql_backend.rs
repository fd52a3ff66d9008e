//! [`sql_backend!`]: the Rust side of [`Backend`](crate::Backend) written once, implemented for a
//! database from its statements.

/// Implements [`Backend`](crate::Backend) for a database from its statements: the Rust side (what
/// to run after what, what it means) is the same everywhere. Module `$sql` provides, keyed
/// statements bound first with (consumer, source, key), source being '' for the default source:
///
/// - `RECORD_KEYED`, bound (consumer, source, key, seq): records a keyed message in one statement;
///   how it answers is the first step below.
/// - `RECORD_GAP: Option<&str>`, bound (consumer, source, key, from, to): records the gap a new
///   message skipped; `None` when `RECORD_KEYED` records it itself.
/// - `FILL_GAP: &[&str]`, each bound (consumer, source, key, seq), run in order on the key row
///   locked by `RECORD_KEYED`: the first answers the gap `(from_seq, to_seq)` holding seq (no row:
///   a duplicate), all together cut seq out of it and keep the key's `gap_from` up to date.
/// - `UNDO_ADVANCE: &[&str]`, each bound (consumer, source, key, previous): puts the key row that
///   `RECORD_KEYED` just advanced past a gap back to seq `previous` (0 for a key it just created),
///   and removes the gap it recorded (the row stays locked): the message is parked instead.
/// - `PARK`, bound (consumer, source, key, seq, id, topic, payload, headers): parks a message
///   unless that (consumer, source, key, seq) is parked already.
/// - `TAKE_PARKED: &[&str]`, each bound (consumer, source, key, seq): the first answers the parked
///   message `(message_id, topic, payload, headers)` (no row: none), the others (run only when
///   there is one) delete it. Taking it out is all of `take_parked`; `unpark` then makes it the
///   key's highest applied seq.
/// - `LOWEST_PARKED`, bound (consumer, source, key): the lowest parked seq of the key (NULL: none).
/// - `CHECK_USABLE: Option<&str>`: a statement that fails on a transaction that can no longer
///   commit; `None` where a failed statement leaves the transaction usable.
/// - `COMMIT_CHECKED: Option<&str>`: statements, one simple query, that fail on a transaction that
///   can no longer commit and otherwise commit it and begin an empty one (which dropping sqlx's
///   transaction rolls back); `None`: a plain commit.
/// - `DROP_PARKED_UPTO`, bound (consumer, source, key, seq): deletes the key's parked messages at
///   or below seq.
/// - `KEY_SEQ`, bound (consumer, source, key): the key's highest applied seq (no row: none).
/// - `LEGACY_KEY: Option<&str>`, bound (consumer, key): a row (any column) when the key has
///   records of the default source; `None` when `RECORD_KEYED` answers that itself. `ADOPT: &[&str]`, each bound (consumer, source, key), run in order: drop the
///   records `RECORD_KEYED` just created for (source, key) and move the default source's records of
///   the key (key row, gaps, parked messages) to `source`.
/// - `RECORD_UNKEYED`, bound (consumer, id): records an unkeyed message unless its id is there.
/// - `DELETE_EXPIRED`, bound (consumer, retention ms, batch): one batch of the cleanup, one
///   statement in a transaction of its own; the rows deleted are the count.
///
/// The first step, the one statement of the common path, is where databases differ:
///
/// - `sql_backend!(Db, sql)`: the record statements answer with rows (`RETURNING`). `RECORD_KEYED`:
///   no row = duplicate; a row `(prev_seq, seq, legacy)` with the message's seq = new (prev_seq: the
///   highest before; legacy: a new key of a source that has records of the default source, with
///   `LEGACY_KEY` `None`); with a higher seq = below the highest while the key has open gaps that
///   may hold it.
///   `RECORD_UNKEYED` and `PARK`: one row inserted = new.
/// - `sql_backend!(Db, sql, record_keyed, record_unkeyed, park)`: the calling module runs them
///   itself and tells what they found, `record_keyed(conn, consumer, source, key, seq) ->
///   Result<KeyStep, _>`, `record_unkeyed(conn, consumer, id) -> Result<bool, _>` and
///   `park(conn, consumer, source, key, seq, msg, headers) -> Result<bool, _>` (true: new); for a
///   database whose statements answer otherwise (MySQL: in the OK packet). They can build their
///   statements with what the macro defines in the module: `keyed(statement, consumer, source,
///   key)` (a query bound that far) and `park_statement(consumer, source, key, seq, msg, headers)`.
macro_rules! sql_backend {
    ($db:ty, $sql:ident) => {
        async fn record_keyed(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            source: &str,
            key: &str,
            seq: i64,
        ) -> Result<$crate::backend::KeyStep, sqlx::Error> {
            let row: Option<(Option<i64>, i64, bool)> = keyed_as($sql::RECORD_KEYED, consumer, source, key)
                .bind(seq)
                .fetch_optional(&mut *conn)
                .await?;
            Ok(match row {
                None => $crate::backend::KeyStep::Duplicate,
                Some((previous, now, legacy)) if now == seq => $crate::backend::KeyStep::New { previous, legacy },
                Some(_) => $crate::backend::KeyStep::BelowTop,
            })
        }

        async fn record_unkeyed(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            id: ::uuid::Uuid,
        ) -> Result<bool, sqlx::Error> {
            let done = sqlx::query($sql::RECORD_UNKEYED)
                .bind(consumer)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        #[allow(clippy::too_many_arguments)]
        async fn park(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            source: &str,
            key: &str,
            seq: i64,
            msg: &$crate::Incoming<'_>,
            headers: &[u8],
        ) -> Result<bool, sqlx::Error> {
            let done = park_statement(consumer, source, key, seq, msg, headers)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        $crate::backend::sql_backend!($db, $sql, record_keyed, record_unkeyed, park);
    };
    ($db:ty, $sql:ident, $record_keyed:ident, $record_unkeyed:ident, $park:ident) => {
        /// `statement` bound (consumer, source, key), as every keyed statement starts.
        fn keyed<'q>(
            statement: &'q str,
            consumer: &'q str,
            source: &'q str,
            key: &'q str,
        ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
            sqlx::query(statement).bind(consumer).bind(source).bind(key)
        }

        /// [`keyed`] for a statement that answers rows of `O`.
        fn keyed_as<'q, O>(
            statement: &'q str,
            consumer: &'q str,
            source: &'q str,
            key: &'q str,
        ) -> sqlx::query::QueryAs<'q, $db, O, <$db as sqlx::Database>::Arguments<'q>>
        where
            O: for<'r> sqlx::FromRow<'r, <$db as sqlx::Database>::Row>,
        {
            sqlx::query_as(statement).bind(consumer).bind(source).bind(key)
        }

        /// `PARK` bound (consumer, source, key, seq, id, topic, payload, headers).
        fn park_statement<'q>(
            consumer: &'q str,
            source: &'q str,
            key: &'q str,
            seq: i64,
            msg: &$crate::Incoming<'q>,
            headers: &'q [u8],
        ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
            keyed($sql::PARK, consumer, source, key)
                .bind(seq)
                .bind(msg.id)
                .bind(msg.topic)
                .bind(msg.payload)
                .bind(headers)
        }

        /// Runs `statements` in order, each bound (consumer, source, key) and then `n`, if any.
        async fn run_each(
            conn: &mut <$db as sqlx::Database>::Connection,
            statements: &[&str],
            consumer: &str,
            source: &str,
            key: &str,
            n: Option<i64>,
        ) -> Result<(), sqlx::Error> {
            for statement in statements {
                let query = keyed(statement, consumer, source, key);
                match n {
                    Some(n) => query.bind(n),
                    None => query,
                }
                .execute(&mut *conn)
                .await?;
            }
            Ok(())
        }

        /// Records the open gap `from..=to` of (consumer, source, key), where `RECORD_KEYED` does
        /// not record it itself.
        async fn record_gap(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            source: &str,
            key: &str,
            from: i64,
            to: i64,
        ) -> Result<(), sqlx::Error> {
            if let Some(record_gap) = $sql::RECORD_GAP {
                keyed(record_gap, consumer, source, key)
                    .bind(from)
                    .bind(to)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        /// If (consumer, key) has records of the default source (`legacy`: `RECORD_KEYED` found
        /// them; otherwise `LEGACY_KEY` asks, where there is one), drops the records just created
        /// for (consumer, source, key) and moves the default source's ones there. True when it did.
        async fn adopt(
            conn: &mut <$db as sqlx::Database>::Connection,
            consumer: &str,
            source: &str,
            key: &str,
            legacy: bool,
        ) -> Result<bool, sqlx::Error> {
            let legacy = match $sql::LEGACY_KEY {
                Some(statement) if !legacy => {
                    let row: Option<(i64,)> = sqlx::query_as(statement)
                        .bind(consumer)
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await?;
                    row.is_some()
                }
                _ => legacy,
            };
            if !legacy {
                return Ok(false);
            }
            run_each(&mut *conn, $sql::ADOPT, consumer, source, key, None).await?;
            Ok(true)
        }

        #[async_trait::async_trait]
        impl $crate::Backend for $db {
            async fn record(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                msg: &$crate::Incoming<'_>,
                hold: bool,
            ) -> Result<$crate::Recorded, sqlx::Error> {
                let Some((key, seq)) = msg.key_seq() else {
                    return Ok(if $record_unkeyed(&mut *conn, consumer, msg.id).await? {
                        $crate::Recorded::New { previous: None }
                    } else {
                        $crate::Recorded::Duplicate
                    });
                };
                let source = msg.scope();
                let mut step = $record_keyed(&mut *conn, consumer, source, key, seq).await?;
                let first_of_source = match step {
                    $crate::backend::KeyStep::New {
                        previous: None,
                        legacy,
                    } if !source.is_empty() => Some(legacy),
                    _ => None,
                };
                if let Some(legacy) = first_of_source {
                    if adopt(&mut *conn, consumer, source, key, legacy).await? {
                        // The key's records from before sources were sent are this source's now:
                        // record the message again against them.
                        step = $record_keyed(&mut *conn, consumer, source, key, seq).await?;
                    }
                }
                match step {
                    $crate::backend::KeyStep::Duplicate => Ok($crate::Recorded::Duplicate),
                    $crate::backend::KeyStep::New { previous, .. } => {
                        let from = previous.unwrap_or(0) + 1;
                        if hold && from < seq {
                            run_each(
                                &mut *conn,
                                $sql::UNDO_ADVANCE,
                                consumer,
                                source,
                                key,
                                Some(from - 1),
                            )
                            .await?;
                            let headers = $crate::parked::encode_headers(&msg.headers);
                            let parked = $park(&mut *conn, consumer, source, key, seq, msg, &headers).await?;
                            return Ok(if parked {
                                $crate::Recorded::Parked { previous }
                            } else {
                                $crate::Recorded::Duplicate
                            });
                        }
                        if from < seq {
                            record_gap(&mut *conn, consumer, source, key, from, seq - 1).await?;
                        }
                        Ok($crate::Recorded::New { previous })
                    }
                    $crate::backend::KeyStep::BelowTop => {
                        let (first, rest) = $sql::FILL_GAP.split_first().expect("FILL_GAP has a statement");
                        let gap: Option<(i64, i64)> = keyed_as(first, consumer, source, key)
                            .bind(seq)
                            .fetch_optional(&mut *conn)
                            .await?;
                        run_each(&mut *conn, rest, consumer, source, key, Some(seq)).await?;
                        Ok(match gap {
                            Some((from, to)) => $crate::Recorded::FilledGap { from, to },
                            None => $crate::Recorded::Duplicate,
                        })
                    }
                }
            }

            async fn take_parked(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                source: &str,
                key: &str,
                seq: i64,
            ) -> Result<Option<$crate::Parked>, sqlx::Error> {
                let (first, rest) = $sql::TAKE_PARKED
                    .split_first()
                    .expect("TAKE_PARKED has a statement");
                let row: Option<(::uuid::Uuid, String, Vec<u8>, Vec<u8>)> = keyed_as(first, consumer, source, key)
                    .bind(seq)
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some((id, topic, payload, headers)) = row else {
                    return Ok(None);
                };
                run_each(&mut *conn, rest, consumer, source, key, Some(seq)).await?;
                let headers = $crate::parked::decode_headers(&headers)
                    .map_err(|e| sqlx::Error::Decode(format!("parked message {id}: headers: {e}").into()))?;
                Ok(Some($crate::Parked {
                    id,
                    topic,
                    payload,
                    headers,
                }))
            }

            async fn unpark(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                source: &str,
                key: &str,
                seq: i64,
                skipping: bool,
            ) -> Result<Option<($crate::Parked, i64)>, sqlx::Error> {
                let Some(parked) =
                    <$db as $crate::Backend>::take_parked(&mut *conn, consumer, source, key, seq).await?
                else {
                    return Ok(None);
                };
                // Parked messages are above the key's highest seq (this transaction holds the key
                // row): the message becomes the highest. Unless skipping, it is the next one.
                let previous = match $record_keyed(&mut *conn, consumer, source, key, seq).await? {
                    $crate::backend::KeyStep::New { previous, .. } if previous.unwrap_or(0) == seq - 1 => seq - 1,
                    $crate::backend::KeyStep::New { previous, .. } if skipping && previous.unwrap_or(0) < seq => {
                        let previous = previous.unwrap_or(0);
                        record_gap(&mut *conn, consumer, source, key, previous + 1, seq - 1).await?;
                        previous
                    }
                    other => {
                        return Err(sqlx::Error::Protocol(format!(
                            "parked message {seq} of a key does not follow its highest applied seq: {other:?}"
                        )))
                    }
                };
                Ok(Some((parked, previous)))
            }

            async fn lock_key(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                source: &str,
                key: &str,
            ) -> Result<(), sqlx::Error> {
                // Recording seq 0 changes nothing (every seq is above it) but takes the key row's
                // lock, as any record does; a key with no row gets one with nothing applied (0).
                $record_keyed(&mut *conn, consumer, source, key, 0).await?;
                Ok(())
            }

            async fn lowest_parked(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                source: &str,
                key: &str,
            ) -> Result<Option<i64>, sqlx::Error> {
                sqlx::query_scalar($sql::LOWEST_PARKED)
                    .bind(consumer)
                    .bind(source)
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await
            }

            async fn commit_checked(mut tx: sqlx::Transaction<'_, $db>) -> Result<(), sqlx::Error> {
                match $sql::COMMIT_CHECKED {
                    None => tx.commit().await,
                    Some(statements) => {
                        let conn: &mut <$db as sqlx::Database>::Connection = &mut tx;
                        sqlx::Executor::execute(&mut *conn, statements).await?;
                        // Committed; `tx` rolls the empty transaction back as it is dropped (with
                        // the connection's next statement, no round trip of its own).
                        Ok(())
                    }
                }
            }

            async fn check_usable(conn: &mut <$db as sqlx::Database>::Connection) -> Result<(), sqlx::Error> {
                if let Some(check) = $sql::CHECK_USABLE {
                    sqlx::query(check).execute(&mut *conn).await?;
                }
                Ok(())
            }

            async fn drop_parked_upto(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                source: &str,
                key: &str,
                seq: i64,
            ) -> Result<(), sqlx::Error> {
                keyed($sql::DROP_PARKED_UPTO, consumer, source, key)
                    .bind(seq)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }

            async fn key_seq(
                conn: &mut <$db as sqlx::Database>::Connection,
                consumer: &str,
                source: &str,
                key: &str,
            ) -> Result<Option<i64>, sqlx::Error> {
                sqlx::query_scalar($sql::KEY_SEQ)
                    .bind(consumer)
                    .bind(source)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await
            }

            async fn delete_expired(
                pool: &sqlx::Pool<$db>,
                consumer: &str,
                retention_ms: i64,
                batch: i64,
            ) -> Result<u64, sqlx::Error> {
                let done = sqlx::query($sql::DELETE_EXPIRED)
                    .bind(consumer)
                    .bind(retention_ms)
                    .bind(batch)
                    .execute(pool)
                    .await?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(crate) use sql_backend;
