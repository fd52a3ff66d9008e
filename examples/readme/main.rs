//! The README's "Add it to a service" snippets, line for line, in the functions a service writes
//! them in: this file is compiled with the workspace, and `tests/readme.rs` checks that every line of
//! those snippets is here, so the README cannot show code that does not build.
//!
//! ```sh
//! bash .ci/services
//! cargo run --example readme -- postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! enqueues one order message, then embeds a relay (towards `broker:9092`, as in the README) until
//! Ctrl-C.

use serde::Serialize;

#[derive(Serialize)]
struct Order {
    id: u64,
    sku: String,
}

/// Nothing left of the SKU: no order, no message.
#[derive(Debug, thiserror::Error)]
#[error("sold out")]
struct SoldOut;

/// The outbox's tables, once at start-up.
#[rustfmt::skip]
async fn start_up(pool: sqlx::PgPool) -> anyhow::Result<()> {
    outbox::postgres::migrate(&pool).await?;              // at start-up, or copy migrations/postgres/*.sql into yours
    Ok(())
}

/// A business transaction that also enqueues its message.
#[rustfmt::skip]
async fn place_order(pool: sqlx::PgPool, sku: &str, order: &Order) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let sold = sqlx::query("UPDATE stock SET qty = qty - 1 WHERE sku = $1 AND qty > 0").bind(sku).execute(&mut *tx).await?;
    if sold.rows_affected() == 0 {
        return Err(SoldOut.into());                                // `tx` dropped: rolled back, no message
    }
    let msg = outbox::Message::json("order.placed.v1", &order)?   // stable type names, chosen by you
        .key(format!("order-{}", order.id))                        // per-key order; Kafka key
        .header("content-type", "application/json");
    outbox::enqueue(&mut tx, &msg).await?;                         // only inside a transaction
    tx.commit().await?;                                            // commit = it will be delivered
    Ok(())
}

/// The relay embedded in the service, until `shutdown_signal` completes.
#[rustfmt::skip]
fn embed_relay(pool: &sqlx::PgPool) -> anyhow::Result<tokio::task::JoinHandle<Result<(), outbox_relay::RelayError>>> {
    let store = outbox::postgres::PgStore::new(pool.clone());
    let publisher = outbox_kafka::KafkaPublisher::new([("bootstrap.servers", "broker:9092")])?;
    Ok(tokio::spawn(outbox_relay::Relay::new(store, publisher).run_until(shutdown_signal())))
}

async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: readme DATABASE_URL  (enqueues one order message, then embeds a relay until Ctrl-C)");
        return Ok(());
    };
    let pool = sqlx::PgPool::connect(&url).await?;
    start_up(pool.clone()).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty INT NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO stock VALUES ('sku-1', 10) ON CONFLICT DO NOTHING")
        .execute(&pool)
        .await?;
    place_order(
        pool.clone(),
        "sku-1",
        &Order {
            id: 1,
            sku: "sku-1".into(),
        },
    )
    .await?;
    println!("order 1 enqueued; the relay publishes it to broker:9092 (Ctrl-C stops)");
    embed_relay(&pool)?.await??;
    Ok(())
}
