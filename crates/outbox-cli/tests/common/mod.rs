//! What several of this crate's test binaries use (each binary uses a part of it).
#![allow(dead_code)]

use std::collections::HashSet;

/// The shared nats-server of `.ci/nats` (or `OUTBOX_TEST_NATS`).
pub(crate) fn nats_url() -> String {
    std::env::var("OUTBOX_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The ids `query` (`SELECT id FROM …`) answers on `pool`.
pub(crate) async fn ids_of(pool: &sqlx::PgPool, query: &str) -> HashSet<uuid::Uuid> {
    sqlx::query_scalar::<_, uuid::Uuid>(query)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}
