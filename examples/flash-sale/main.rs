//! Flash sale: a burst of concurrent purchases decrements stock and enqueues `order.placed` in the
//! same transaction (never overselling); the relay smooths the burst into Kafka; an order service
//! consumes idempotently into its own database. See README.md beside this file.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use outbox::Message;
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_kafka::{ConsumerRunner, KafkaPublisher};
use outbox_relay::{Relay, RelayConfig};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};

const TOPIC: &str = "order.placed.v1";

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: uuid::Uuid,
    sku: String,
    user: u32,
}

/// The order service: records each order once in its own database.
struct OrderService;

#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("bad payload: {0}")]
    Payload(#[from] serde_json::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[async_trait]
impl Handler<sqlx::Postgres> for OrderService {
    type Error = OrderError;
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        msg: &Incoming<'_>,
    ) -> Result<(), OrderError> {
        let o: OrderPlaced = serde_json::from_slice(msg.payload)?;
        sqlx::query("INSERT INTO fulfilment (order_id, sku, buyer) VALUES ($1, $2, $3)")
            .bind(o.order_id)
            .bind(&o.sku)
            .bind(o.user as i64)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn fresh_db(admin_url: &str, name: &str) -> anyhow::Result<PgPool> {
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connect to PostgreSQL")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    Ok(PgPoolOptions::new()
        .max_connections(32)
        .connect(&format!("{base}/{name}"))
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let pg = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let kafka = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let stock: i64 = std::env::var("STOCK").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let buyers: u32 = std::env::var("BUYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);

    // The shop's database (stock, orders, outbox) and the order service's own database.
    let shop = fresh_db(&pg, "flash_sale_shop").await?;
    let orders = fresh_db(&pg, "flash_sale_orders").await?;
    outbox::postgres::migrate(&shop).await?;
    outbox::postgres::migrate(&orders).await?; // inbox tables
    sqlx::raw_sql(
        "CREATE TABLE stock (sku TEXT PRIMARY KEY, qty BIGINT NOT NULL CHECK (qty >= 0));
         CREATE TABLE orders (id UUID PRIMARY KEY, sku TEXT NOT NULL, buyer BIGINT NOT NULL);",
    )
    .execute(&shop)
    .await?;
    sqlx::query("INSERT INTO stock VALUES ('console', $1)")
        .bind(stock)
        .execute(&shop)
        .await?;
    sqlx::raw_sql("CREATE TABLE fulfilment (order_id UUID PRIMARY KEY, sku TEXT NOT NULL, buyer BIGINT NOT NULL)")
        .execute(&orders)
        .await?;

    // A topic of this run's own: a new consumer group reads its topic from the start, and a shared
    // one would hand it the orders of every earlier run.
    let topic = format!("{TOPIC}.{}", uuid::Uuid::new_v4().simple());
    outbox_kafka::ensure_topic(&kafka, &topic, 4)
        .await
        .context("is the broker running? bash .ci/services")?;

    // Relay (embedded here; in production usually the outbox-relay daemon) and order service.
    let publisher = KafkaPublisher::new([("bootstrap.servers", kafka.as_str())])?;
    let (stop_relay, relay_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        Relay::new(outbox::postgres::PgStore::new(shop.clone()), publisher)
            .config(RelayConfig::default().poll_interval(Duration::from_millis(200)))
            .run_until(async {
                let _ = relay_rx.await;
            }),
    );
    let group = format!("order-service-{}", uuid::Uuid::new_v4().simple());
    let runner = ConsumerRunner::new(
        [("bootstrap.servers", kafka.as_str()), ("group.id", group.as_str())],
        &[topic.as_str()],
        orders.clone(),
        Inbox::new("order-service"),
        OrderService,
    )?;
    let consumed = runner.stats();
    let (stop_consumer, consumer_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(runner.run_until(async {
        let _ = consumer_rx.await;
    }));

    // The burst: every buyer tries at once.
    println!("flash sale: {stock} consoles, {buyers} buyers arriving at once");
    let (sold, rejected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let burst = Instant::now();
    let mut tasks = Vec::new();
    for user in 0..buyers {
        let (shop, sold, rejected, topic) = (shop.clone(), sold.clone(), rejected.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = shop.begin().await?;
            // The conditional decrement locks the stock row: it can never go below zero.
            let left: Option<i64> =
                sqlx::query_scalar("UPDATE stock SET qty = qty - 1 WHERE sku = 'console' AND qty > 0 RETURNING qty")
                    .fetch_optional(&mut *tx)
                    .await?;
            if left.is_none() {
                tx.rollback().await?;
                rejected.fetch_add(1, Relaxed);
                return Ok::<_, anyhow::Error>(());
            }
            let order_id = uuid::Uuid::now_v7();
            sqlx::query("INSERT INTO orders VALUES ($1, 'console', $2)")
                .bind(order_id)
                .bind(user as i64)
                .execute(&mut *tx)
                .await?;
            let msg = Message::json(
                topic,
                &OrderPlaced {
                    order_id,
                    sku: "console".into(),
                    user,
                },
            )?
            .key(order_id.to_string());
            outbox::enqueue(&mut tx, &msg).await?;
            tx.commit().await?;
            sold.fetch_add(1, Relaxed);
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let accepted_in = burst.elapsed();
    println!(
        "burst handled in {:.0} ms: {} sold, {} told 'sold out'",
        accepted_in.as_secs_f64() * 1e3,
        sold.load(Relaxed),
        rejected.load(Relaxed)
    );

    // Downstream catches up at its own pace.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM fulfilment")
            .fetch_one(&orders)
            .await?;
        println!("  order service has {done}/{} orders", sold.load(Relaxed));
        if done as u64 >= sold.load(Relaxed) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained_in = burst.elapsed();
    stop_relay.send(()).ok();
    stop_consumer.send(()).ok();
    relay.await??;
    consumer.await??;

    let left: i64 = sqlx::query_scalar("SELECT qty FROM stock").fetch_one(&shop).await?;
    let shop_orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&shop)
        .await?;
    let fulfilled: i64 = sqlx::query_scalar("SELECT count(*) FROM fulfilment")
        .fetch_one(&orders)
        .await?;
    println!();
    println!("stock left:              {left}");
    println!("orders in the shop:      {shop_orders}");
    println!(
        "orders fulfilled:        {fulfilled} (duplicates suppressed: {})",
        consumed.duplicates.load(Relaxed)
    );
    println!("burst accepted in:       {:.0} ms", accepted_in.as_secs_f64() * 1e3);
    println!("everything delivered in: {:.0} ms", drained_in.as_secs_f64() * 1e3);
    // Every buyer gets one while stock lasts: fewer buyers than stock leave the rest on the shelf.
    let expect_sold = stock.min(i64::from(buyers));
    let ok = left == stock - expect_sold
        && shop_orders == expect_sold
        && fulfilled == shop_orders
        && sold.load(Relaxed) == expect_sold as u64;
    println!(
        "{}",
        if ok {
            "OK: no overselling, every order delivered once"
        } else {
            "FAILED"
        }
    );
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
