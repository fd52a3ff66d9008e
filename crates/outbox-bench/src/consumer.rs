//! Figure 5: consumption with the inbox (dedup record in the handler's transaction) against plain
//! consumption running the same handler in its own transaction.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_inbox::{Handler, Inbox, Incoming};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgPool, Postgres, Transaction};

use crate::common::{new_topic, print_figure, BenchDb, Env, Figure, Row, Target, PARTITIONS};

/// The handler both variants run: one row per message.
struct Record;

#[async_trait]
impl Handler<Postgres> for Record {
    type Error = sqlx::Error;
    async fn handle(&self, tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
        apply(tx, msg).await
    }
}

async fn apply(tx: &mut Transaction<'_, Postgres>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO bench_processed (id, topic, len) VALUES ($1, $2, $3)")
        .bind(msg.id)
        .bind(msg.topic)
        .bind(msg.payload.len() as i32)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Read only.
    Raw,
    /// Handler in its own transaction, no dedup.
    Plain,
    /// Through `Inbox::process`.
    Inbox,
}

fn consumer(bootstrap: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

/// Consumes `topic` from the beginning for `dur` (or until `total` messages) in `mode`; msg/s.
async fn consume(
    pool: &PgPool,
    bootstrap: &str,
    topic: &str,
    mode: Mode,
    total: usize,
    dur: Duration,
) -> anyhow::Result<f64> {
    let c = consumer(bootstrap, topic)?;
    // The first message starts the clock (connection and fetch start-up are not consumption).
    let inbox = Inbox::new("bench");
    let mut n = 0usize;
    let mut started: Option<Instant> = None;
    loop {
        if let Some(s) = started {
            if s.elapsed() >= dur || n >= total {
                break;
            }
        }
        let Some(res) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = res?;
        started.get_or_insert_with(Instant::now);
        let headers: Vec<(&str, &[u8])> = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value.unwrap_or_default())).collect())
            .unwrap_or_default();
        let incoming = Incoming::from_headers(m.topic(), m.payload().unwrap_or_default(), headers)?;
        match mode {
            Mode::Raw => {}
            Mode::Plain => {
                let mut tx = pool.begin().await?;
                apply(&mut tx, &incoming).await?;
                tx.commit().await?;
            }
            Mode::Inbox => {
                let out = inbox.process(pool, &incoming, &Record).await?;
                anyhow::ensure!(out.is_done(), "inbox held a message");
            }
        }
        c.store_offset_from_message(&m)?;
        n += 1;
    }
    let secs = started.map_or(1.0, |s| s.elapsed().as_secs_f64());
    Ok(n as f64 / secs)
}

/// Runs figure 5.
pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let rounds = env.rounds(3, 1);
    let dur = Duration::from_millis(env.pick(5000, 1500));
    let total = env.pick(20_000usize, 5_000);
    let bootstrap = env.kafka.clone();
    let db = BenchDb::create(env, 4).await?;
    let mut rows = Vec::new();
    for keyed in [true, false] {
        let topic = new_topic(env, &bootstrap, "bench-consume").await?;
        produce(&bootstrap, &topic, total, keyed).await?;
        let mut rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (i, mode) in [Mode::Plain, Mode::Inbox, Mode::Raw].into_iter().enumerate() {
                sqlx::raw_sql("TRUNCATE bench_processed, outbox_inbox_keys, outbox_inbox_messages")
                    .execute(&db.pool)
                    .await?;
                let r = consume(&db.pool, &bootstrap, &topic, mode, total, dur).await?;
                eprintln!(
                    "consumer: {} round {}/{rounds}, {mode:?}: {r:.0} msg/s",
                    if keyed { "keyed" } else { "unkeyed" },
                    round + 1
                );
                rates[i].push(r);
            }
        }
        let kind = if keyed { "keyed" } else { "unkeyed" };
        let plain = Row::rate(
            format!("{kind}: plain consumption (handler tx per message, no dedup)"),
            rates[0].clone(),
        );
        rows.push(plain.clone());
        rows.push(
            Row::rate(
                format!("{kind}: inbox-deduplicated consumption (Inbox::process)"),
                rates[1].clone(),
            )
            .vs(&plain)
            .target(Target::AtLeast(0.8)),
        );
        rows.push(Row::rate(
            format!("{kind}: read only, no database (context)"),
            rates[2].clone(),
        ));
        crate::common::delete_topic(env, &bootstrap, &topic).await;
    }
    db.drop_db().await;
    let fig = Figure {
        id: "consumer".into(),
        title: "5. Consumer: inbox vs plain".into(),
        setup: format!(
            "Apache Kafka ({bootstrap}). {total} messages with the headers a relay sends (outbox-source included; keyed: {} keys, dense seqs; unkeyed) in a topic of \
             {PARTITIONS} partitions, read from the beginning by one rdkafka consumer for {:.1} s per run, one message at a \
             time as ConsumerRunner does. Plain = the handler (insert one row) in its own transaction; inbox = \
             Inbox::process with the same handler. Inbox tables truncated before each run; variants interleaved.",
            crate::common::KEYS.min(total),
            dur.as_secs_f64()
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}

/// Writes `n` messages with the framework headers to `topic`, as a relay sends them: the outbox
/// database's `outbox-source` on each (so the first message of a key also looks for the key's
/// records from before sources, as it does for a relay's).
async fn produce(bootstrap: &str, topic: &str, n: usize, keyed: bool) -> anyhow::Result<()> {
    use outbox::{HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let body = crate::common::payload();
    let source = uuid::Uuid::new_v4().to_string();
    let mut futs = Vec::with_capacity(n);
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let k = crate::common::key(i);
        let seq = (i / crate::common::KEYS + 1).to_string();
        let h = outbox_kafka::wire_headers([
            (HEADER_ID, Some(id.as_str())),
            (HEADER_KEY, keyed.then_some(k.as_str())),
            (HEADER_SEQ, keyed.then_some(seq.as_str())),
            (HEADER_SOURCE, Some(source.as_str())),
        ]);
        let mut rec = FutureRecord::to(topic).payload(&body);
        if keyed {
            rec = rec.key(k.as_str());
        }
        match producer.send_result(rec.headers(h)) {
            Ok(f) => futs.push(f),
            Err((e, _)) => anyhow::bail!("producing consumer input: {e}"),
        }
    }
    for f in futs {
        f.await?
            .map_err(|(e, _)| anyhow::anyhow!("producing consumer input: {e}"))?;
    }
    Ok(())
}
