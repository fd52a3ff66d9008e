//! One drain: an embedded relay with defaults on a filled backlog, publishing to a broker or to a
//! publisher that confirms after a delay, timed until every row is marked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::postgres::PgStore;
use outbox::Publisher;
use outbox_kafka::KafkaPublisher;
use outbox_relay::{Relay, RelayConfig};

use crate::common::{BenchDb, CpuProbe, CpuUsed, UntilStopped};
use crate::probe::{NullPublisher, Phases, TimedPublisher, TimedStore};

/// What one drain measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Drained {
    pub(crate) secs: f64,
    pub(crate) msgs: u64,
    pub(crate) cpu: CpuUsed,
    /// Claim, publish, mark microseconds per message (summed over lanes).
    pub(crate) phases_us: (f64, f64, f64),
    pub(crate) avg_batch: f64,
}

impl Drained {
    pub(crate) fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
    pub(crate) fn cpu_us_per_msg(&self) -> f64 {
        self.cpu.bench * 1e6 / self.msgs.max(1) as f64
    }
}

/// The relay settings used for drains: defaults (batch 500, 32 lanes), 100 ms poll.
pub(crate) fn drain_config() -> RelayConfig {
    RelayConfig::default().poll_interval(Duration::from_millis(100))
}

/// Where a drain publishes: a broker, or [`NullPublisher`] confirming after a delay (zero: the
/// SQL-only drain).
#[derive(Clone)]
pub(crate) enum Sink<'a> {
    Broker(&'a str),
    Null(Duration),
    /// Any publisher (the RabbitMQ and NATS drains).
    Publisher(Arc<dyn Publisher>),
}

/// Runs an embedded relay on `db` until `n` rows are marked.
pub(crate) async fn relay_drain(
    db: &BenchDb,
    cfg: RelayConfig,
    sink: Sink<'_>,
    broker_pid: Option<u32>,
    n: u64,
    limit: Duration,
) -> anyhow::Result<Drained> {
    let phases = Phases::until(n);
    let store = TimedStore::new(PgStore::new(db.pool.clone()), phases.clone());
    let cpu = CpuProbe::start(broker_pid);
    let started = Instant::now();
    let relay = match sink {
        Sink::Broker(b) => {
            let publisher = TimedPublisher {
                inner: KafkaPublisher::new([("bootstrap.servers", b)])?,
                phases: phases.clone(),
                reports: None,
            };
            UntilStopped::relay(Relay::new(store, publisher).config(cfg))
        }
        Sink::Publisher(inner) => {
            let publisher = TimedPublisher {
                inner,
                phases: phases.clone(),
                reports: None,
            };
            UntilStopped::relay(Relay::new(store, publisher).config(cfg))
        }
        Sink::Null(delay) => {
            let publisher = TimedPublisher {
                inner: NullPublisher { delay },
                phases: phases.clone(),
                reports: None,
            };
            UntilStopped::relay(Relay::new(store, publisher).config(cfg))
        }
    };
    let reached = phases.wait(limit).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    relay.stop().await?;
    let msgs = phases.marked.load(Ordering::Relaxed);
    if !reached {
        eprintln!("  drain stopped by its time limit after {secs:.0} s: {msgs} of {n} rows");
    }
    Ok(Drained {
        secs,
        msgs,
        cpu,
        phases_us: phases.per_msg_us(),
        avg_batch: phases.avg_batch(),
    })
}
