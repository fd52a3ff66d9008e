//! The baselines that do without the relay: a raw producer sending the relay's messages from
//! memory, and a naive relay handling one row at a time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::postgres::PgStore;
use outbox::{Delivered, Publisher, Store, HEADER_ID, HEADER_KEY, HEADER_SEQ};
use outbox_kafka::{wire_headers, KafkaPublisher, PRODUCER_DEFAULTS};
use rdkafka::config::ClientConfig;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::Drained;
use crate::common::{key, payload, BenchDb, CpuProbe};

struct CountDeliveries {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for CountDeliveries {}

impl ProducerContext for CountDeliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Sends `n` messages shaped like the relay's (same key, headers, payload, producer settings)
/// from memory with a raw rdkafka producer, and waits for every delivery report.
pub(crate) async fn raw_produce(
    bootstrap: &str,
    broker_pid: Option<u32>,
    topic: &str,
    n: usize,
) -> anyhow::Result<Drained> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        // The messages exist before the clock starts (the relay's come from the table).
        let msgs: Vec<(String, String, String)> = (0..n)
            .map(|i| {
                (
                    key(i),
                    uuid::Uuid::now_v7().to_string(),
                    (i / crate::common::KEYS + 1).to_string(),
                )
            })
            .collect();
        let body = payload();
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &bootstrap);
        for (k, v) in PRODUCER_DEFAULTS {
            cfg.set(*k, *v);
        }
        let producer: ThreadedProducer<CountDeliveries> = cfg.create_with_context(CountDeliveries {
            ok: ok.clone(),
            failed: failed.clone(),
        })?;
        let cpu = CpuProbe::start(broker_pid);
        let started = Instant::now();
        for (k, id, seq) in &msgs {
            let headers = wire_headers([
                (HEADER_ID, Some(id.as_str())),
                (HEADER_KEY, Some(k.as_str())),
                (HEADER_SEQ, Some(seq.as_str())),
            ]);
            let mut rec = BaseRecord::to(&topic).key(k.as_str()).payload(&body).headers(headers);
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => anyhow::bail!("raw producer: {e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(300))?;
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu.stop();
        anyhow::ensure!(failed.load(Ordering::Relaxed) == 0, "raw producer: failed deliveries");
        Ok(Drained {
            secs,
            msgs: ok.load(Ordering::Relaxed),
            cpu,
            ..Drained::default()
        })
    })
    .await?
}

/// The naive relay: claim one row, send it, wait for its report, delete it; repeat. Runs on a
/// backlog of `n` rows for at most `limit`; returns what it got through.
pub(crate) async fn naive_drain(db: &BenchDb, bootstrap: &str, n: u64, limit: Duration) -> anyhow::Result<Drained> {
    let store = PgStore::new(db.pool.clone());
    let owner = format!("naive-{}", uuid::Uuid::new_v4().simple());
    let leases = store
        .acquire(&owner, outbox::LANES as usize, Duration::from_secs(600))
        .await?;
    let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap)])?;
    let started = Instant::now();
    let cpu = CpuProbe::start(None);
    let mut done = 0u64;
    let mut idle_lanes = 0;
    'outer: while done < n && started.elapsed() < limit {
        for lease in &leases {
            let rows = store.claim(lease, 1, &[]).await?;
            if rows.is_empty() {
                idle_lanes += 1;
                if idle_lanes > leases.len() {
                    break 'outer;
                }
                continue;
            }
            idle_lanes = 0;
            let res = publisher.publish(&rows).await;
            let delivered: Vec<Delivered> = res.into_iter().filter_map(Result::ok).collect();
            store.mark_published(lease, &delivered).await?;
            done += delivered.len() as u64;
            if done >= n || started.elapsed() >= limit {
                break;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    for l in &leases {
        store.release(l).await?;
    }
    Ok(Drained {
        secs,
        msgs: done,
        cpu,
        ..Drained::default()
    })
}
