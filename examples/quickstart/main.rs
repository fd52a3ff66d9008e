//! Quickstart: the whole outbox path on an embedded default, no servers needed.
//!
//! A small order service writes orders and `order.placed.v1` messages in SQLite transactions (some
//! rolled back on purpose); the embedded relay publishes them to librdkafka's in-process mock Kafka
//! cluster; a billing consumer applies them through the inbox to its own SQLite database, while the
//! demo delivers some messages twice. It ends with a summary and exits non-zero if a check fails.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use outbox::{Delivered, Message, Outbox, PublishError, Publisher, StoreAdmin, StoredMessage};
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_kafka::{ConsumerRunner, KafkaPublisher};
use outbox_relay::{Relay, RelayConfig};
use rand::{Rng, SeedableRng};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

const TOPIC: &str = "order.placed.v1";
const ORDERS: usize = 400;
const CUSTOMERS: usize = 25;

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: uuid::Uuid,
    customer: String,
    amount_cents: i64,
}

/// Publishes through Kafka and, now and then, publishes part of a batch a second time: what a relay
/// that crashed after publishing but before marking would do on restart.
struct SometimesTwice {
    inner: KafkaPublisher,
    resent: AtomicU64,
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

#[async_trait]
impl Publisher for SometimesTwice {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let out = self.inner.publish(batch).await;
        let again = {
            let mut rng = self.rng.lock().unwrap();
            if rng.gen_bool(0.4) {
                rng.gen_range(1..=batch.len())
            } else {
                0
            }
        };
        if again > 0 {
            self.inner.publish(&batch[..again]).await;
            self.resent.fetch_add(again as u64, Relaxed);
        }
        out
    }
}

/// Billing: keeps per-customer totals. Not idempotent by itself (it adds), the inbox makes it so.
struct Billing;

#[derive(Debug, thiserror::Error)]
enum BillingError {
    #[error("bad payload: {0}")]
    Payload(#[from] serde_json::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[async_trait]
impl Handler<sqlx::Sqlite> for Billing {
    type Error = BillingError;
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        msg: &Incoming<'_>,
    ) -> Result<(), BillingError> {
        let o: OrderPlaced = serde_json::from_slice(msg.payload)?;
        sqlx::query(
            "INSERT INTO totals (customer, orders, amount_cents) VALUES (?1, 1, ?2) \
             ON CONFLICT (customer) DO UPDATE SET orders = orders + 1, amount_cents = amount_cents + ?2",
        )
        .bind(&o.customer)
        .bind(o.amount_cents)
        .execute(&mut **tx)
        .await?;
        // A primary key: applying an order twice would fail here.
        sqlx::query("INSERT INTO billed (order_id) VALUES (?1)")
            .bind(o.order_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn sqlite(path: &std::path::Path) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
    outbox::sqlite::migrate(&pool).await.context("outbox migrations")?;
    Ok(pool)
}

type Totals = BTreeMap<String, (i64, i64)>;

async fn totals(pool: &SqlitePool, sql: &str) -> anyhow::Result<Totals> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(sql).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(c, n, a)| (c, (n, a))).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .init();
    let dir = std::env::temp_dir().join(format!("outbox-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "outbox quickstart: SQLite files in {} + in-process mock Kafka",
        dir.display()
    );

    // The order service's database and the billing service's database.
    let shop = sqlite(&dir.join("shop.db")).await?;
    let billing = sqlite(&dir.join("billing.db")).await?;
    sqlx::raw_sql("CREATE TABLE orders (id BLOB PRIMARY KEY, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL)")
        .execute(&shop)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE totals (customer TEXT PRIMARY KEY, orders INTEGER NOT NULL, amount_cents INTEGER NOT NULL);
         CREATE TABLE billed (order_id BLOB PRIMARY KEY);",
    )
    .execute(&billing)
    .await?;

    // Kafka: librdkafka's mock cluster, inside this process.
    let cluster = rdkafka::mocking::MockCluster::new(1)?;
    cluster.create_topic(TOPIC, 3, 1)?;
    let bootstrap = cluster.bootstrap_servers();

    // The embedded relay, woken in-process by Outbox::commit (SQLite has no LISTEN).
    let outbox = Outbox::new();
    let store = outbox::sqlite::SqliteStore::new(shop.clone());
    let publisher = Arc::new(SometimesTwice {
        inner: KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str()), ("linger.ms", "2")])?,
        resent: AtomicU64::new(0),
        rng: std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(7)),
    });
    let (stop_relay, relay_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = Relay::new(store.clone(), publisher.clone())
        .config(RelayConfig::default().batch_size(50))
        .wake_on(outbox.local_wakeup());
    // What the relay marked published, each row once the broker confirmed it.
    let health = relay.health();
    let relay = tokio::spawn(relay.run_until(async {
        let _ = relay_rx.await;
    }));

    // The billing consumer: offsets committed only after the inbox transaction.
    let runner = ConsumerRunner::new(
        [("bootstrap.servers", bootstrap.as_str()), ("group.id", "billing")],
        &[TOPIC],
        billing.clone(),
        Inbox::new("billing"),
        Billing,
    )?;
    let consumed = runner.stats();
    let (stop_consumer, consumer_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(runner.run_until(async {
        let _ = consumer_rx.await;
    }));

    // The order service: each order and its message in one transaction; some fail on purpose.
    let (committed, rolled_back) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut rolled_back_ids = HashSet::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let started = Instant::now();
    let mut last_report = Instant::now();
    for i in 0..ORDERS {
        let order_id = uuid::Uuid::now_v7();
        let customer = format!("customer-{}", rng.gen_range(0..CUSTOMERS));
        let amount_cents = rng.gen_range(500..20_000);
        let mut tx = shop.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO orders VALUES (?1, ?2, ?3)")
            .bind(order_id)
            .bind(&customer)
            .bind(amount_cents)
            .execute(&mut *tx)
            .await?;
        let msg = Message::json(
            TOPIC,
            &OrderPlaced {
                order_id,
                customer: customer.clone(),
                amount_cents,
            },
        )?
        .key(customer);
        outbox.enqueue(&mut tx, &msg).await?;
        if rng.gen_bool(0.12) {
            tx.rollback().await?; // "card declined": neither the order nor its message exists
            rolled_back.fetch_add(1, Relaxed);
            rolled_back_ids.insert(order_id);
        } else {
            outbox.commit(tx).await?;
            committed.fetch_add(1, Relaxed);
        }
        if i % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await; // orders trickle in
        }
        if last_report.elapsed() > Duration::from_millis(400) {
            progress(&store, &committed, &rolled_back, &consumed).await?;
            last_report = Instant::now();
        }
    }

    // Wait for the relay and the consumer to catch up.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        progress(&store, &committed, &rolled_back, &consumed).await?;
        let pending = store.status().await?.pending;
        if pending == 0 && consumed.processed.load(Relaxed) >= committed.load(Relaxed) {
            break;
        }
        if Instant::now() > deadline {
            println!("timed out waiting for the pipeline to drain");
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Give the last duplicates time to arrive and be suppressed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop_relay.send(()).ok();
    stop_consumer.send(()).ok();
    relay.await??;
    consumer.await??;

    // The checks.
    let shop_totals = totals(
        &shop,
        "SELECT customer, count(*), sum(amount_cents) FROM orders GROUP BY customer ORDER BY 1",
    )
    .await?;
    let billing_totals = totals(&billing, "SELECT customer, orders, amount_cents FROM totals ORDER BY 1").await?;
    let billed: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT order_id FROM billed")
        .fetch_all(&billing)
        .await?;
    let leaked = billed.iter().filter(|id| rolled_back_ids.contains(id)).count();
    let (c, r) = (committed.load(Relaxed), rolled_back.load(Relaxed));
    let status = store.status().await?;
    let published = health.published();
    let (processed, dups) = (consumed.processed.load(Relaxed), consumed.duplicates.load(Relaxed));
    let resent = publisher.resent.load(Relaxed);

    println!();
    println!("summary ({:.1}s)", started.elapsed().as_secs_f64());
    println!("  orders committed            {c:>5}   (each with its message, in one transaction)");
    println!("  orders rolled back          {r:>5}   (no message left the service: {leaked} leaked)");
    println!("  messages published          {published:>5}   (confirmed by the broker, then marked)");
    println!("  extra copies put on the wire {resent:>4}   (simulated relay crash between publish and mark)");
    println!("  applied by billing          {processed:>5}");
    println!("  duplicates suppressed       {dups:>5}   (by the inbox, in billing's own transaction)");
    println!(
        "  customers, shop vs billing  {:>5} vs {}",
        shop_totals.len(),
        billing_totals.len()
    );

    let checks = [
        (
            "every committed order was published",
            published == c && status.pending == 0,
        ),
        ("no rolled-back order reached billing", leaked == 0 && r > 0),
        (
            "billing applied each order exactly once",
            processed == c && billed.len() as u64 == c,
        ),
        ("duplicates were delivered and suppressed", resent > 0 && dups > 0),
        ("billing's totals equal the shop's", shop_totals == billing_totals),
        (
            "nothing dead-lettered",
            status.dead_letters == 0 && consumed.dead_lettered.load(Relaxed) == 0,
        ),
    ];
    println!();
    let mut ok = true;
    for (what, pass) in checks {
        println!("  [{}] {what}", if pass { " ok " } else { "FAIL" });
        ok &= pass;
    }
    std::fs::remove_dir_all(&dir).ok();
    if !ok {
        std::process::exit(1);
    }
    println!("\nall checks passed");
    Ok(())
}

async fn progress(
    store: &outbox::sqlite::SqliteStore,
    committed: &AtomicU64,
    rolled_back: &AtomicU64,
    consumed: &outbox_kafka::ConsumerStats,
) -> anyhow::Result<()> {
    let pending = store.status().await?.pending;
    let c = committed.load(Relaxed);
    println!(
        "  committed {c:>4} | rolled back {:>3} | published {:>4} | applied {:>4} | duplicates suppressed {:>3}",
        rolled_back.load(Relaxed),
        c as i64 - pending,
        consumed.processed.load(Relaxed),
        consumed.duplicates.load(Relaxed),
    );
    Ok(())
}
