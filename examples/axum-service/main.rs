//! An axum service that enqueues inside its request handler's transaction and embeds the relay in
//! the same process.
//!
//! ```sh
//! bash .ci/services                      # PostgreSQL + Apache Kafka on 127.0.0.1:19092
//! cargo run --example axum-service       # listens on 127.0.0.1:3000
//! curl -X POST localhost:3000/orders -H 'content-type: application/json' -d '{"customer":"ada","amount_cents":1250}'
//! curl localhost:3000/orders/<id>        # the order, and whether its message was published
//! ```
//! Environment: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres), KAFKA_BOOTSTRAP
//! (default 127.0.0.1:19092), LISTEN (default 127.0.0.1:3000).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::{Message, Outbox};
use outbox_kafka::KafkaPublisher;
use outbox_relay::{Relay, RelayConfig};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Clone)]
struct App {
    pool: PgPool,
    outbox: Outbox,
}

#[derive(Deserialize)]
struct NewOrder {
    customer: String,
    amount_cents: i64,
}

#[derive(Serialize)]
struct OrderPlaced {
    order_id: uuid::Uuid,
    customer: String,
    amount_cents: i64,
}

/// An application error as an HTTP answer: the caller's bad input is 400, anything else 500
/// (logged).
struct AppError(StatusCode, String);

impl From<outbox::Error> for AppError {
    fn from(e: outbox::Error) -> Self {
        // A message enqueued twice, or one whose payload did not encode, is this service's bug.
        let ours = matches!(e, outbox::Error::DuplicateId(_) | outbox::Error::Serialize(_));
        if e.is_bad_input() && !ours {
            return AppError(StatusCode::BAD_REQUEST, e.to_string());
        }
        // Database trouble, and anything that is not the caller's fault.
        tracing::error!(error = %e, "request failed");
        AppError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        outbox::Error::from(e).into()
    }
}

impl axum::response::IntoResponse for AppError {
    fn into_response(self) -> axum::response::Response {
        (self.0, self.1).into_response()
    }
}

/// The order row and its `order.placed.v1` message commit together, or neither does.
async fn place_order(
    State(app): State<App>,
    Json(req): Json<NewOrder>,
) -> Result<(StatusCode, Json<serde_json::Value>), AppError> {
    if req.amount_cents <= 0 {
        return Err(AppError(
            StatusCode::BAD_REQUEST,
            "amount_cents must be positive".into(),
        ));
    }
    let order_id = uuid::Uuid::now_v7();
    let event = OrderPlaced {
        order_id,
        customer: req.customer.clone(),
        amount_cents: req.amount_cents,
    };
    let msg = Message::json("order.placed.v1", &event)?.key(req.customer.clone());
    let mut tx = app.pool.begin().await?;
    sqlx::query("INSERT INTO orders (id, customer, amount_cents, message_id) VALUES ($1, $2, $3, $4)")
        .bind(order_id)
        .bind(&req.customer)
        .bind(req.amount_cents)
        .bind(msg.id())
        .execute(&mut *tx)
        .await?;
    app.outbox.enqueue(&mut tx, &msg).await?;
    app.outbox.commit(tx).await?; // commits, then wakes the embedded relay
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": order_id, "message_id": msg.id() })),
    ))
}

async fn get_order(State(app): State<App>, Path(id): Path<uuid::Uuid>) -> Result<Json<serde_json::Value>, AppError> {
    let row: Option<(String, i64, uuid::Uuid)> =
        sqlx::query_as("SELECT customer, amount_cents, message_id FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&app.pool)
            .await?;
    let (customer, amount_cents, message_id) = row.ok_or(AppError(StatusCode::NOT_FOUND, "no such order".into()))?;
    // A row leaves the outbox table when it is published (to outbox_published when kept) and when
    // it is dead-lettered (to outbox_dead_letters): both are asked.
    let (pending, dead): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM outbox_messages WHERE id = $1), \
                EXISTS (SELECT 1 FROM outbox_dead_letters WHERE id = $1)",
    )
    .bind(message_id)
    .fetch_one(&app.pool)
    .await?;
    let message = match (pending, dead) {
        (true, _) => "pending",
        (false, true) => "dead_lettered",
        (false, false) => "published",
    };
    Ok(Json(serde_json::json!({
        "id": id, "customer": customer, "amount_cents": amount_cents, "message": message,
    })))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let kafka = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());

    let pool = PgPool::connect(&url).await?;
    outbox::postgres::migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id UUID PRIMARY KEY, customer TEXT NOT NULL, \
         amount_cents BIGINT NOT NULL, message_id UUID NOT NULL)",
    )
    .execute(&pool)
    .await?;
    outbox_kafka::ensure_topic(&kafka, "order.placed.v1", 4).await?;
    let app = App {
        pool: pool.clone(),
        outbox: Outbox::new(),
    };

    // The relay runs in this process, woken at commit by NOTIFY and by Outbox::commit.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(
        Relay::new(
            outbox::postgres::PgStore::new(pool.clone()),
            KafkaPublisher::new([("bootstrap.servers", kafka)])?,
        )
        .config(RelayConfig::default().shutdown_grace(Duration::from_secs(10)))
        .wake_on(app.outbox.local_wakeup())
        .run_until(wait_stop(stop_rx.clone())),
    );

    let router = Router::new()
        .route("/orders", post(place_order))
        .route("/orders/{id}", get(get_order))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "order service listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    // Only once the requests in flight are answered (their messages committed): the relay then
    // drains its in-flight batches before the process exits.
    stop_tx.send(true).ok();
    relay.await??;
    Ok(())
}

async fn wait_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
