//! MySQL / MariaDB inbox (MySQL 8.0.13+, MariaDB 10.6+, InnoDB): the dedup record is one upsert
//! (keyed) or one insert (unkeyed) on the handler's transaction, as on PostgreSQL; cleanup deletes
//! expired records by batches of one short statement.
//!
//! MySQL has no `RETURNING`, so the record statements answer in their OK packet instead: the rows
//! affected, and the value they passed to `LAST_INSERT_ID(expr)` (see `sql.rs`). Recording a message
//! therefore sets the session's `LAST_INSERT_ID()`: a handler reads the id of its own
//! `AUTO_INCREMENT` insert from that insert's result, or with `LAST_INSERT_ID()` right after it.
//! Everything after the first statement (gap bookkeeping, parking, cleanup) is the shared logic of
//! [`sql_backend!`](crate::backend::sql_backend).

mod sql;

use sqlx::MySqlConnection;
use uuid::Uuid;

use crate::backend::KeyStep;
use crate::Incoming;

/// Runs `RECORD_KEYED` and reads its answer from the OK packet: two rows affected = the key row
/// advanced (an updated row counts 2), the insert id being the highest seq before; otherwise the
/// insert id tells a new key (nothing passed, 0), a duplicate, or a seq to look up in the gaps.
async fn record_keyed(
    conn: &mut MySqlConnection,
    consumer: &str,
    source: &str,
    key: &str,
    seq: i64,
) -> Result<KeyStep, sqlx::Error> {
    let done = keyed(sql::RECORD_KEYED, consumer, source, key)
        .bind(seq)
        .execute(&mut *conn)
        .await?;
    // LAST_INSERT_ID hands a BIGINT back as unsigned: `as` restores the seq bit for bit.
    Ok(match (done.rows_affected(), done.last_insert_id()) {
        (2, previous) => KeyStep::New {
            previous: Some(previous as i64),
            legacy: false,
        },
        // Whether the key has records of the default source is asked by `LEGACY_KEY`.
        (_, sql::ANSWER_INSERTED) => KeyStep::New {
            previous: None,
            legacy: false,
        },
        (_, sql::ANSWER_DUPLICATE) => KeyStep::Duplicate,
        (_, sql::ANSWER_BELOW_TOP) => KeyStep::BelowTop,
        (rows, answer) => {
            return Err(sqlx::Error::Protocol(format!(
                "unexpected answer of the inbox record statement: {rows} rows, insert id {answer}"
            )))
        }
    })
}

/// Runs `RECORD_UNKEYED`: a duplicate leaves [`sql::ANSWER_DUPLICATE`] in the OK packet, a new row
/// nothing (0). The rows affected cannot tell: sqlx connects with `CLIENT_FOUND_ROWS`, so a
/// duplicate that changed nothing counts 1, as an insert does.
async fn record_unkeyed(conn: &mut MySqlConnection, consumer: &str, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(sql::RECORD_UNKEYED)
        .bind(consumer)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.last_insert_id() != sql::ANSWER_DUPLICATE)
}

/// Runs `PARK`: a message parked before leaves [`sql::ANSWER_PARKED_BEFORE`] in the OK packet, a
/// new row nothing (0).
#[allow(clippy::too_many_arguments)]
async fn park(
    conn: &mut MySqlConnection,
    consumer: &str,
    source: &str,
    key: &str,
    seq: i64,
    msg: &Incoming<'_>,
    headers: &[u8],
) -> Result<bool, sqlx::Error> {
    let done = park_statement(consumer, source, key, seq, msg, headers)
        .execute(&mut *conn)
        .await?;
    Ok(done.last_insert_id() != sql::ANSWER_PARKED_BEFORE)
}

crate::backend::sql_backend!(sqlx::MySql, sql, record_keyed, record_unkeyed, park);
