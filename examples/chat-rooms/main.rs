//! Chat rooms on NATS JetStream: members post through the outbox (the post row and its message in
//! one PostgreSQL transaction); the relay publishes each post to the subject of its room
//! (`chat.<room>`); every member reads every room through its own durable consumer into its own
//! database. Checks that each member got each room's messages exactly once and in order.
//!
//! Needs PostgreSQL (`DATABASE_URL`, default 127.0.0.1) and nats-server with JetStream (`NATS_URL`,
//! default 127.0.0.1:4222; `bash .ci/nats up` starts one). Run: `cargo run --example chat-rooms`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use async_trait::async_trait;
use outbox::Message;
use outbox_inbox::{Handler, Inbox, Incoming};
use outbox_nats::{async_nats, NatsConfig, NatsConsumerConfig, NatsConsumerRunner, NatsPublisher};
use outbox_relay::Relay;
use sqlx::{Connection, PgPool};

const ROOMS: &[&str] = &["lobby", "rust", "random"];
const MEMBERS: &[&str] = &["alice", "bob", "carol"];
const POSTS_PER_MEMBER_AND_ROOM: usize = 10;
const STREAM: &str = "CHAT_ROOMS";

#[derive(serde::Serialize, serde::Deserialize)]
struct Post {
    author: String,
    text: String,
}

/// A member's screen: each message it sees lands once in its own `seen` table.
struct Screen;

#[derive(Debug, thiserror::Error)]
enum ScreenError {
    #[error("bad post: {0}")]
    Payload(#[from] serde_json::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[async_trait]
impl Handler<sqlx::Postgres> for Screen {
    type Error = ScreenError;
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        msg: &Incoming<'_>,
    ) -> Result<(), ScreenError> {
        let post: Post = serde_json::from_slice(msg.payload)?;
        sqlx::query("INSERT INTO seen (room, seq, author, text) VALUES ($1, $2, $3, $4)")
            .bind(msg.key)
            .bind(msg.seq)
            .bind(&post.author)
            .bind(&post.text)
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
    let pool = PgPool::connect(&format!("{base}/{name}")).await?;
    outbox::postgres::migrate(&pool).await?; // the outbox, and the inbox's tables
    Ok(pool)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let pg = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());

    // The chat service's database (posts and outbox), and one database per member.
    let chat = fresh_db(&pg, "chat_rooms_service").await?;
    sqlx::query(
        "CREATE TABLE posts (id UUID PRIMARY KEY, room TEXT NOT NULL, author TEXT NOT NULL, text TEXT NOT NULL)",
    )
    .execute(&chat)
    .await?;

    // One stream for every room: subject chat.<room> (the room is the message key).
    let client = async_nats::connect(&nats).await.context("connect to nats-server")?;
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream(STREAM).await; // a clean start
    outbox_nats::ensure_stream(&client, STREAM, &["chat.*"]).await?;

    let mut members = Vec::new();
    for m in MEMBERS {
        let db = fresh_db(&pg, &format!("chat_rooms_{m}")).await?;
        sqlx::query("CREATE TABLE seen (n BIGSERIAL PRIMARY KEY, room TEXT NOT NULL, seq BIGINT NOT NULL, author TEXT NOT NULL, text TEXT NOT NULL)")
            .execute(&db)
            .await?;
        let cfg = NatsConsumerConfig::new(STREAM, *m).url(nats.clone());
        let runner = NatsConsumerRunner::connect(cfg, db.clone(), Inbox::new(*m), Screen).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(runner.run_until(async {
            let _ = stopped.await;
        }));
        members.push((*m, db, stop, task));
    }

    // The relay, embedded: outbox -> JetStream.
    let publisher = NatsPublisher::connect(NatsConfig::default().url(nats.clone())).await?;
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        Relay::new(outbox::postgres::PgStore::new(chat.clone()), publisher).run_until(async {
            let _ = relay_stopped.await;
        }),
    );

    // Everyone posts in every room at once: each post and its message commit together.
    let mut writers = Vec::new();
    for author in MEMBERS {
        let chat = chat.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..POSTS_PER_MEMBER_AND_ROOM {
                for room in ROOMS {
                    let post = Post {
                        author: author.to_string(),
                        text: format!("{author}'s message {i} in #{room}"),
                    };
                    let msg = Message::json("chat", &post)?.key(*room);
                    let mut tx = chat.begin().await?;
                    sqlx::query("INSERT INTO posts VALUES ($1, $2, $3, $4)")
                        .bind(msg.id())
                        .bind(room)
                        .bind(&post.author)
                        .bind(&post.text)
                        .execute(&mut *tx)
                        .await?;
                    outbox::enqueue(&mut tx, &msg).await?;
                    tx.commit().await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let total = (MEMBERS.len() * ROOMS.len() * POSTS_PER_MEMBER_AND_ROOM) as i64;
    println!(
        "{total} posts committed in {} rooms by {} members",
        ROOMS.len(),
        MEMBERS.len()
    );

    // Wait until every member has seen every post.
    let start = Instant::now();
    for (name, db, _, _) in &members {
        loop {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen").fetch_one(db).await?;
            if n >= total {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "{name} saw only {n} of {total} posts"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Each member saw each room's posts once, in the order the room's seqs were given at commit.
    let mut ok = true;
    for (name, db, _, _) in &members {
        for room in ROOMS {
            let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM seen WHERE room = $1 ORDER BY n")
                .bind(room)
                .fetch_all(db)
                .await?;
            let in_order = seqs.iter().copied().eq(1..=seqs.len() as i64);
            ok &= in_order;
            println!(
                "  [{}] {name} saw #{room}: {} messages, each once, in order",
                if in_order { " ok " } else { "FAIL" },
                seqs.len()
            );
        }
    }
    let transcript: Vec<(String, String)> =
        sqlx::query_as("SELECT author, text FROM seen WHERE room = 'rust' ORDER BY n LIMIT 4")
            .fetch_all(&members[1].1)
            .await?;
    println!("#rust as bob saw it begin:");
    for (author, text) in transcript {
        println!("  <{author}> {text}");
    }

    for (_, _, stop, task) in members {
        let _ = stop.send(());
        task.await??;
    }
    let _ = stop_relay.send(());
    relay.await??;
    ensure!(ok, "a member saw a room out of order");
    Ok(())
}
