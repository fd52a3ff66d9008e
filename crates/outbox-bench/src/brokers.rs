//! Figure 7, the relay's drain on each broker: Kafka, RabbitMQ and NATS JetStream, each as a ratio to the
//! SQL-only drain of the same round, with the broker's own client publishing the same messages from
//! memory (with the same confirmation: Kafka `acks=all`, RabbitMQ publisher confirms, JetStream
//! publish acks) as the anchor for what that server can take on this machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use outbox_nats::async_nats;

use crate::common::{fill_backlog, key, new_topic, payload, print_figure, BenchDb, CpuProbe, Env, Figure, Row};
use crate::drain::{drain_config, raw_produce, relay_drain, Drained, Sink};

/// Messages each raw client keeps unconfirmed at most (the relay has 32 lanes x 500).
const WINDOW: usize = 4096;

fn rabbitmq_url() -> String {
    std::env::var("OUTBOX_BENCH_RABBITMQ").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn nats_url() -> String {
    std::env::var("OUTBOX_BENCH_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn amqp() -> anyhow::Result<lapin::Connection> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    lapin::Connection::connect(&rabbitmq_url(), props)
        .await
        .context("connecting to RabbitMQ (.ci/rabbitmq up)")
}

/// A durable queue named `topic` (the default exchange routes the relay's messages to it).
async fn declare_queue(topic: &str) -> anyhow::Result<()> {
    let conn = amqp().await?;
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(topic, durable, FieldTable::default()).await?;
    conn.close(200, "declared").await?;
    Ok(())
}

async fn delete_queue(topic: &str) {
    if let Ok(conn) = amqp().await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(topic, QueueDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "deleted").await;
    }
}

/// `n` persistent, mandatory messages on one confirm channel, at most [`WINDOW`] unconfirmed.
async fn raw_rabbitmq(topic: &str, n: usize) -> anyhow::Result<Drained> {
    let conn = amqp().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = payload();
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let cpu = CpuProbe::start(None);
    let started = Instant::now();
    let mut confirmed = 0u64;
    for chunk in ids.chunks(WINDOW) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for id in chunk {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            let opts = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            confirms.push(ch.basic_publish("", topic, opts, &body, props).await?);
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "RabbitMQ nacked a message");
            confirmed += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    conn.close(200, "done").await?;
    Ok(Drained {
        secs,
        msgs: confirmed,
        cpu,
        ..Drained::default()
    })
}

/// A file-backed stream taking `<topic>.>`.
async fn create_stream(client: &async_nats::Client, topic: &str) -> anyhow::Result<String> {
    let name = topic.replace(['.', '-'], "_").to_uppercase();
    let subject = format!("{topic}.>");
    outbox_nats::ensure_stream(client, &name, &[subject.as_str()]).await?;
    Ok(name)
}

/// `n` messages with `Nats-Msg-Id` (the relay sets it too, so the stream deduplicates both), at most
/// [`WINDOW`] acks outstanding.
async fn raw_nats(client: &async_nats::Client, topic: &str, n: usize) -> anyhow::Result<Drained> {
    let js = async_nats::jetstream::new(client.clone());
    let body: bytes::Bytes = payload().into();
    let msgs: Vec<(String, String)> = (0..n)
        .map(|i| (format!("{topic}.{}", key(i)), uuid::Uuid::now_v7().to_string()))
        .collect();
    let cpu = CpuProbe::start(None);
    let started = Instant::now();
    let acks = futures::stream::iter(msgs.iter().map(|(subject, id)| {
        let (js, body) = (&js, body.clone());
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = js.publish_with_headers(subject.clone(), headers, body).await?;
            ack.await.map(drop).map_err(anyhow::Error::from)
        }
    }))
    .buffer_unordered(WINDOW)
    .fold(Ok::<u64, anyhow::Error>(0), |n, r: anyhow::Result<()>| async move {
        Ok(n? + r.map(|()| 1)?)
    })
    .await?;
    Ok(Drained {
        secs: started.elapsed().as_secs_f64(),
        msgs: acks,
        cpu: cpu.stop(),
        ..Drained::default()
    })
}

/// One relay drain of `n` rows through `publisher`.
async fn drain_to(env: &Env, publisher: Arc<dyn outbox::Publisher>, topic: &str, n: usize) -> anyhow::Result<Drained> {
    let db = BenchDb::create(env, 20).await?;
    fill_backlog(&db.pool, topic, n).await?;
    let limit = Duration::from_secs(env.pick(600, 120));
    let d = relay_drain(&db, drain_config(), Sink::Publisher(publisher), None, n as u64, limit).await;
    db.drop_db().await;
    d
}

pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let n = env.pick(200_000usize, 20_000);
    let rounds = env.rounds(3, 1);
    let limit = Duration::from_secs(env.pick(600, 120));
    let nats = async_nats::connect(nats_url())
        .await
        .context("connecting to NATS (.ci/nats up)")?;
    let names = ["kafka", "rabbitmq", "nats"];
    let (mut sql, mut relay, mut raw) = (Vec::new(), vec![Vec::new(); 3], vec![Vec::new(); 3]);
    for round in 0..rounds {
        eprintln!("brokers: round {}/{rounds}, backlog {n}", round + 1);
        let db = BenchDb::create(env, 20).await?;
        fill_backlog(&db.pool, "bench-sql", n).await?;
        let d = relay_drain(&db, drain_config(), Sink::Null(Duration::ZERO), None, n as u64, limit).await?;
        db.drop_db().await;
        eprintln!("  sql-only: {:.0} msg/s", d.rate());
        sql.push(d);
        // The brokers in a rotating order, each drained by the relay then by its own client.
        for i in 0..names.len() {
            let b = (i + round) % names.len();
            let topic = new_topic(env, &env.kafka, "bench-brokers").await?;
            let (drained, anchor) = match names[b] {
                "kafka" => {
                    let publisher = outbox_kafka::KafkaPublisher::new([("bootstrap.servers", env.kafka.as_str())])?;
                    let d = drain_to(env, Arc::new(publisher), &topic, n).await?;
                    (
                        d,
                        raw_produce(&env.kafka, crate::common::broker_pid(), &topic, n).await?,
                    )
                }
                "rabbitmq" => {
                    declare_queue(&topic).await?;
                    let publisher =
                        outbox_rabbitmq::RabbitPublisher::connect(outbox_rabbitmq::RabbitConfig::new(rabbitmq_url()))
                            .await?;
                    let d = drain_to(env, Arc::new(publisher), &topic, n).await?;
                    let raw = raw_rabbitmq(&topic, n).await?;
                    delete_queue(&topic).await;
                    (d, raw)
                }
                _ => {
                    let stream = create_stream(&nats, &topic).await?;
                    let publisher =
                        outbox_nats::NatsPublisher::connect(outbox_nats::NatsConfig::default().url(nats_url())).await?;
                    let d = drain_to(env, Arc::new(publisher), &topic, n).await?;
                    let raw = raw_nats(&nats, &topic, n).await?;
                    let _ = async_nats::jetstream::new(nats.clone()).delete_stream(&stream).await;
                    (d, raw)
                }
            };
            crate::common::delete_topic(env, &env.kafka, &topic).await;
            eprintln!(
                "  {}: relay {:.0} msg/s, raw client {:.0} msg/s",
                names[b],
                drained.rate(),
                anchor.rate()
            );
            relay[b].push(drained);
            raw[b].push(anchor);
        }
    }
    let rate = |v: &[Drained]| v.iter().map(Drained::rate).collect::<Vec<f64>>();
    let sql_row = Row::rate("SQL-only drain (claim + delete, no broker)", rate(&sql));
    let mut rows = vec![sql_row.clone()];
    let clients = [
        "rdkafka producer, acks=all, idempotence, linger 5 ms; flushed at the end".to_owned(),
        format!("lapin, one confirm channel, persistent + mandatory; {WINDOW} unconfirmed at most"),
        format!("async-nats JetStream publish with Nats-Msg-Id; {WINDOW} acks outstanding at most"),
    ];
    for (b, name) in names.iter().enumerate() {
        let raw_row = Row::rate(format!("raw client on {name} ({})", clients[b]), rate(&raw[b]));
        let relay_row = Row::rate(format!("relay drain on {name}"), rate(&relay[b]));
        rows.push(relay_row.clone().vs(&sql_row).note("relay / SQL-only, same round"));
        rows.push(relay_row.vs(&raw_row).note("relay / raw client, same round"));
        rows.push(raw_row);
    }
    let fig = Figure {
        id: "brokers".into(),
        title: "7. Relay drain per broker".into(),
        setup: format!(
            "Backlog of {n} keyed rows ({} keys, {}-byte payloads) per drain; relay embedded with defaults \
             (batch 500, 32 lanes, claim_ahead never); each publisher with its defaults (Kafka: acks=all, \
             idempotence, linger 5 ms, topic of {} partitions; RabbitMQ {}: default exchange to a durable queue, \
             persistent, mandatory, confirms, one channel per lane; NATS {}: a file-backed stream, publish acks, \
             a chain per key). Per round: SQL-only, then the brokers in a rotating order, each drained by the \
             relay and then written by its own client from memory (the same number of messages).",
            crate::common::KEYS,
            crate::common::PAYLOAD_BYTES,
            crate::common::PARTITIONS,
            outbox::redact::redact_url(&rabbitmq_url()),
            nats_url(),
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}
