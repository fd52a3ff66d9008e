//! The consumer side of the end-to-end tests: an `effects` table with one row per application of a
//! message (no unique constraint, so a second application of the same message shows as a second
//! row; `n` gives the order of application) and the handler that writes it.

use async_trait::async_trait;
use outbox_inbox::{Handler, Incoming};

/// The transaction a PostgreSQL handler writes in.
pub type PgTx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

/// The `effects` table.
pub const CREATE_EFFECTS: &str =
    "CREATE TABLE effects (n BIGSERIAL PRIMARY KEY, message_id UUID NOT NULL, key TEXT, seq BIGINT)";

/// Writes one `effects` row per applied message, in the inbox's transaction.
#[derive(Clone, Copy, Debug, Default)]
pub struct EffectRows;

#[async_trait]
impl Handler<sqlx::Postgres> for EffectRows {
    type Error = sqlx::Error;
    async fn handle(&self, tx: &mut PgTx<'_>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO effects (message_id, key, seq) VALUES ($1, $2, $3)")
            .bind(msg.id)
            .bind(msg.key)
            .bind(msg.seq)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// A fresh PostgreSQL database (outbox and inbox migrated) with the `effects` table.
pub async fn effects_db() -> sqlx::PgPool {
    let pool = crate::db::fresh_pg().await;
    sqlx::query(CREATE_EFFECTS).execute(&pool).await.unwrap();
    pool
}
