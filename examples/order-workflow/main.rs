//! Order workflow on RabbitMQ across three services, each with its own PostgreSQL database:
//! orders enqueues `order.placed`; payments consumes it through the inbox and, in the same
//! transaction, records the payment and enqueues `payment.captured`; fulfilment consumes that and
//! records a shipment. Two relays carry the outboxes to RabbitMQ. It prints what happened and
//! exits non-zero if a check fails.
//!
//! Needs PostgreSQL and RabbitMQ (`bash .ci/services`). Environment (defaults in brackets):
//! `ORDERS_DATABASE_URL` [postgres://postgres@127.0.0.1:5432/example_orders],
//! `PAYMENTS_DATABASE_URL` [.../example_payments], `FULFILMENT_DATABASE_URL`
//! [.../example_fulfilment], `RABBITMQ_URL` [amqp://guest:guest@127.0.0.1:5672/%2f]. The three
//! databases are created (and emptied) by each run.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use outbox::Message;
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_rabbitmq::{RabbitConfig, RabbitConsumerConfig, RabbitConsumerRunner, RabbitPublisher};
use outbox_relay::{Relay, RelayConfig};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool, Postgres, Transaction};
use tokio::sync::watch;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order: uuid::Uuid,
    cents: i64,
}

#[derive(Serialize, Deserialize)]
struct PaymentCaptured {
    order: uuid::Uuid,
    cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum ServiceError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
}

/// Payments: captures the payment and announces it, in the inbox's transaction.
struct Payments {
    captured: String,
}

#[async_trait]
impl Handler<Postgres> for Payments {
    type Error = ServiceError;
    async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), ServiceError> {
        let placed: OrderPlaced = serde_json::from_slice(msg.payload)?;
        sqlx::query("INSERT INTO payments (order_id, cents) VALUES ($1, $2)")
            .bind(placed.order)
            .bind(placed.cents)
            .execute(&mut **tx)
            .await?;
        let captured = PaymentCaptured {
            order: placed.order,
            cents: placed.cents,
        };
        let next = Message::json(&self.captured, &captured)?.key(format!("order-{}", placed.order));
        outbox::enqueue(tx, &next).await?;
        Ok(())
    }
}

/// Fulfilment: ships each paid order.
struct Fulfilment;

#[async_trait]
impl Handler<Postgres> for Fulfilment {
    type Error = ServiceError;
    async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), ServiceError> {
        let paid: PaymentCaptured = serde_json::from_slice(msg.payload)?;
        sqlx::query("INSERT INTO shipments (order_id) VALUES ($1)")
            .bind(paid.order)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// A service's database, created empty, with the outbox and inbox tables and `schema`.
async fn database(var: &str, name: &str, schema: &str) -> anyhow::Result<PgPool> {
    let url = std::env::var(var).unwrap_or_else(|_| format!("postgres://postgres@127.0.0.1:5432/{name}"));
    let (server, db) = url.rsplit_once('/').context("database URL without a database name")?;
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connect to PostgreSQL for {var} (is it running? bash .ci/services)"))?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    let pool = PgPool::connect(&url).await?;
    outbox::postgres::migrate(&pool).await?;
    sqlx::query(schema).execute(&pool).await?;
    Ok(pool)
}

async fn count(pool: &PgPool, table: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rabbit = std::env::var("RABBITMQ_URL").unwrap_or_else(|_| outbox_rabbitmq::DEFAULT_URL.into());
    let orders = database(
        "ORDERS_DATABASE_URL",
        "example_orders",
        "CREATE TABLE orders (id UUID PRIMARY KEY, cents BIGINT NOT NULL)",
    )
    .await?;
    let payments = database(
        "PAYMENTS_DATABASE_URL",
        "example_payments",
        "CREATE TABLE payments (order_id UUID PRIMARY KEY, cents BIGINT NOT NULL)",
    )
    .await?;
    let fulfilment = database(
        "FULFILMENT_DATABASE_URL",
        "example_fulfilment",
        "CREATE TABLE shipments (order_id UUID PRIMARY KEY)",
    )
    .await?;

    // Topics are queue names on the default exchange; this run's own, so no earlier run's
    // messages come in.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (placed, captured) = (format!("order.placed.v1.{run}"), format!("payment.captured.v1.{run}"));

    let (stop, stopped) = watch::channel(false);
    let until_stopped = || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    // The consumers first: their queues must exist before anything is published to them.
    let consumers = [
        (placed.as_str(), payments.clone(), true),
        (captured.as_str(), fulfilment.clone(), false),
    ];
    for (queue, pool, is_payments) in consumers {
        let cfg = RabbitConsumerConfig::new(&rabbit, queue);
        if is_payments {
            let handler = Payments {
                captured: captured.clone(),
            };
            let runner = RabbitConsumerRunner::new(cfg, pool, Inbox::new("payments"), handler)?;
            runner
                .declare()
                .await
                .context("RabbitMQ (is it running? bash .ci/services)")?;
            tasks.push(tokio::spawn(runner.run_until(until_stopped())));
        } else {
            let runner = RabbitConsumerRunner::new(cfg, pool, Inbox::new("fulfilment"), Fulfilment)?;
            runner.declare().await?;
            tasks.push(tokio::spawn(runner.run_until(until_stopped())));
        }
    }
    let mut relays = Vec::new();
    for pool in [&orders, &payments] {
        let publisher = RabbitPublisher::connect(RabbitConfig::new(&rabbit)).await?;
        let relay = Relay::new(outbox::postgres::PgStore::new(pool.clone()), publisher)
            .config(RelayConfig::default().poll_interval(Duration::from_millis(200)));
        relays.push(tokio::spawn(relay.run_until(until_stopped())));
    }

    // The order service: ten orders, the fourth cancelled before its commit.
    let mut placed_ids = Vec::new();
    for i in 1..=10_i64 {
        let order = OrderPlaced {
            order: uuid::Uuid::now_v7(),
            cents: 1000 * i,
        };
        let mut tx = orders.begin().await?;
        sqlx::query("INSERT INTO orders (id, cents) VALUES ($1, $2)")
            .bind(order.order)
            .bind(order.cents)
            .execute(&mut *tx)
            .await?;
        let msg = Message::json(&placed, &order)?.key(format!("order-{}", order.order));
        outbox::enqueue(&mut tx, &msg).await?;
        if i == 4 {
            tx.rollback().await?;
            println!("orders:     order {} cancelled (rolled back: no message)", order.order);
        } else {
            tx.commit().await?;
            placed_ids.push(order.order);
            println!("orders:     order {} placed, {} cents", order.order, order.cents);
        }
    }

    let started = Instant::now();
    while count(&fulfilment, "shipments").await? < placed_ids.len() as i64
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
    for t in relays {
        t.await??;
    }
    for t in tasks {
        t.await??;
    }

    let (o, p, s) = (
        count(&orders, "orders").await?,
        count(&payments, "payments").await?,
        count(&fulfilment, "shipments").await?,
    );
    let paid: i64 = sqlx::query_scalar("SELECT COALESCE(sum(cents), 0)::BIGINT FROM payments")
        .fetch_one(&payments)
        .await?;
    println!("payments:   {p} payments captured, {paid} cents in total");
    println!("fulfilment: {s} orders shipped in {:.1?}", started.elapsed());
    let checks = [
        ("every committed order was paid once", p == o),
        ("every paid order was shipped once", s == p),
        ("the cancelled order went nowhere", o == 9),
        (
            "payments add up",
            paid == (1..=10).filter(|i| *i != 4).map(|i| 1000 * i).sum::<i64>(),
        ),
    ];
    let mut ok = true;
    for (what, passed) in checks {
        println!("  [{}] {what}", if passed { " ok " } else { "FAIL" });
        ok &= passed;
    }
    anyhow::ensure!(ok, "a check failed");
    Ok(())
}
