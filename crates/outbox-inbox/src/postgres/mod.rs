//! PostgreSQL inbox: the dedup record is one upsert (keyed) or one insert (unkeyed) on the
//! handler's transaction; cleanup deletes expired records by batches of row ids.

mod sql;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool, Postgres};

use crate::{Backend, Incoming, Recorded};

#[async_trait]
impl Backend for Postgres {
    async fn record(
        conn: &mut PgConnection,
        consumer: &str,
        msg: &Incoming<'_>,
    ) -> Result<Recorded, sqlx::Error> {
        match msg.key_seq() {
            Some((key, seq)) => {
                let row: Option<(Option<i64>,)> = sqlx::query_as(sql::RECORD_KEYED)
                    .bind(consumer)
                    .bind(key)
                    .bind(seq)
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(match row {
                    None => Recorded::Duplicate,
                    Some((previous,)) => Recorded::New { previous },
                })
            }
            None => {
                let done = sqlx::query(sql::RECORD_UNKEYED)
                    .bind(consumer)
                    .bind(msg.id)
                    .execute(&mut *conn)
                    .await?;
                Ok(if done.rows_affected() == 1 {
                    Recorded::New { previous: None }
                } else {
                    Recorded::Duplicate
                })
            }
        }
    }

    async fn delete_expired(
        pool: &PgPool,
        consumer: &str,
        retention_ms: i64,
        batch: i64,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(sql::DELETE_EXPIRED)
            .bind(consumer)
            .bind(retention_ms)
            .bind(batch)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}
