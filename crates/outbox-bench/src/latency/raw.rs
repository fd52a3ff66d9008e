//! The broker floor: a raw producer sending the relay's batches at the same pace, latency from
//! send to delivery report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{HEADER_ID, HEADER_KEY};
use outbox_kafka::{wire_headers, PRODUCER_DEFAULTS};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use super::{histogram, lat_of, Lat, TX_PER_SEC};
use crate::common::{key, payload, sleep_until, KEYS};

/// The broker alone: a producer with the relay's settings sends the same batches at the same
/// pace; latency from send to delivery report.
pub(super) async fn raw_latency(
    bootstrap: &str,
    topic: &str,
    rate: u64,
    linger_ms: Option<u32>,
    (warm, dur): (Duration, Duration),
) -> anyhow::Result<Lat> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    for (k, v) in PRODUCER_DEFAULTS {
        cfg.set(*k, *v);
    }
    if let Some(l) = linger_ms {
        cfg.set("linger.ms", l.to_string());
    }
    let producer: FutureProducer = cfg.create()?;
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
            let id = Uuid::now_v7().to_string();
            let k = key((i as usize * 7919 + j * 104_729) % KEYS);
            let headers = wire_headers([(HEADER_ID, Some(id.as_str())), (HEADER_KEY, Some(k.as_str()))]);
            let rec = FutureRecord::to(topic).key(k.as_str()).payload(&body).headers(headers);
            match producer.send_result(rec) {
                Ok(f) => futs.push(f),
                Err((e, _)) => anyhow::bail!("raw producer: {e}"),
            }
        }
        let (h, sent) = (h.clone(), sent.clone());
        let measured = at >= measure_from;
        waiters.push(tokio::spawn(async move {
            for f in futs {
                if let Ok(Ok(_)) = f.await {
                    if measured {
                        let us = (t.elapsed().as_micros() as u64).max(1);
                        h.lock().expect("histogram lock").record(us).ok();
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in waiters {
        w.await?;
    }
    let h = h.lock().expect("histogram lock");
    let n = sent.load(Ordering::Relaxed);
    Ok(lat_of(&h, n as f64 / dur.as_secs_f64(), 0))
}
