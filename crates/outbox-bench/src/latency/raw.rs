//! The broker floor: a raw producer sending the relay's batches at the same pace, latency from
//! send to delivery report; and a dual write: the writers' transaction without the outbox, then
//! the same producer, latency from commit to delivery report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use outbox::{HEADER_ID, HEADER_KEY};
use outbox_kafka::{wire_headers, PRODUCER_DEFAULTS};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use uuid::Uuid;

use super::{histogram, lat_of, Lat, TX_PER_SEC};
use crate::common::{key, payload, sleep_until, KEYS};

/// A producer with the relay's settings and `linger_ms` (None: the relay's).
pub(super) fn producer(bootstrap: &str, linger_ms: Option<u32>) -> anyhow::Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    for (k, v) in PRODUCER_DEFAULTS {
        cfg.set(*k, *v);
    }
    if let Some(l) = linger_ms {
        cfg.set("linger.ms", l.to_string());
    }
    Ok(cfg.create()?)
}

/// Sends message `id` as the relay would (its id and key in the headers).
pub(super) fn send(
    producer: &FutureProducer,
    topic: &str,
    id: Uuid,
    k: &str,
    body: &[u8],
) -> anyhow::Result<DeliveryFuture> {
    let id = id.to_string();
    let headers = wire_headers([(HEADER_ID, Some(id.as_str())), (HEADER_KEY, Some(k))]);
    let rec = FutureRecord::to(topic).key(k).payload(body).headers(headers);
    producer
        .send_result(rec)
        .map_err(|(e, _)| anyhow::anyhow!("raw producer: {e}"))
}

/// Waits for the reports of messages sent at `from`, recording each one's latency when
/// `measured`; returns how many were recorded.
pub(super) async fn reported(
    futs: Vec<DeliveryFuture>,
    from: Instant,
    measured: bool,
    h: &Mutex<Histogram<u64>>,
) -> u64 {
    let mut n = 0;
    for f in futs {
        if let Ok(Ok(_)) = f.await {
            if measured {
                let us = (from.elapsed().as_micros() as u64).max(1);
                h.lock().expect("histogram lock").record(us).ok();
                n += 1;
            }
        }
    }
    n
}

/// The broker alone: a producer with the relay's settings sends the same batches at the same
/// pace; latency from send to delivery report.
pub(super) async fn raw_latency(
    bootstrap: &str,
    topic: &str,
    rate: u64,
    linger_ms: Option<u32>,
    (warm, dur): (Duration, Duration),
) -> anyhow::Result<Lat> {
    let producer = producer(bootstrap, linger_ms)?;
    let per_tx = (rate / TX_PER_SEC) as usize;
    let body = payload();
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warm;
    let end = measure_from + dur;
    let h = Arc::new(Mutex::new(histogram()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut waiters = Vec::new();
    for i in 0u64.. {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / TX_PER_SEC);
        if at >= end {
            break;
        }
        sleep_until(at).await;
        let t = Instant::now();
        let mut futs = Vec::with_capacity(per_tx);
        for j in 0..per_tx {
            let k = key((i as usize * 7919 + j * 104_729) % KEYS);
            futs.push(send(&producer, topic, Uuid::now_v7(), &k, &body)?);
        }
        let (h, sent) = (h.clone(), sent.clone());
        let measured = at >= measure_from;
        waiters.push(tokio::spawn(async move {
            sent.fetch_add(reported(futs, t, measured, &h).await, Ordering::Relaxed);
        }));
    }
    for w in waiters {
        w.await?;
    }
    let h = h.lock().expect("histogram lock");
    let n = sent.load(Ordering::Relaxed);
    Ok(lat_of(&h, n as f64 / dur.as_secs_f64(), 0))
}
