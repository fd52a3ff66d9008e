//! The admin HTTP endpoint: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`, and the
//! console (`crate::console`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox::Store;
use outbox_relay::RelayHealth;

/// How long a database may take to answer a readiness check.
const DB_ANSWER: Duration = Duration::from_secs(2);

/// One database the daemon serves, as the admin endpoint sees it.
pub(crate) struct DatabaseView {
    /// `[[database]]` name, or `default`.
    pub(crate) name: String,
    /// The store and its relay's state, once the database was reached.
    pub(crate) connected: OnceLock<Connected>,
}

/// A reached database and the relay draining it.
pub(crate) struct Connected {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) health: RelayHealth,
}

impl DatabaseView {
    pub(crate) fn new(name: &str) -> Arc<Self> {
        Arc::new(DatabaseView {
            name: name.to_owned(),
            connected: OnceLock::new(),
        })
    }

    /// Called once the database was reached and its relay built.
    pub(crate) fn connected(&self, store: Arc<dyn Store>, health: RelayHealth) {
        // Set once per view: each database's task reaches its database once.
        let _ = self.connected.set(Connected { store, health });
    }
}

/// How often the Prometheus recorder's histograms are drained when nobody scrapes `/metrics`.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the process's Prometheus recorder and keeps it drained. The recorder keeps every
/// histogram sample (one per message published, one per batch) until it is drained, which without
/// an upkeep task only a scrape of `/metrics` does: a daemon nobody scraped grew by 8 bytes per
/// message for as long as it ran.
pub(crate) fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    keep_drained(handle.clone(), UPKEEP);
    Ok(handle)
}

/// Drains `handle`'s histograms every `every`, for as long as the runtime runs.
fn keep_drained(handle: PrometheusHandle, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            handle.run_upkeep();
        }
    })
}

/// What the admin routes share.
pub(crate) struct AdminState {
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) databases: Vec<Arc<DatabaseView>>,
    /// The relays' lease TTL: a lane unowned for longer is served by nobody.
    pub(crate) lease_ttl: Duration,
    /// `/readyz` fails once the broker has been unavailable this long.
    pub(crate) broker_unavailable: Duration,
    /// When the daemon started (lanes are not expected to be owned before a lease has passed).
    pub(crate) started: Instant,
    /// Token the console's write actions need; `None` turns them off.
    pub(crate) token: Option<crate::settings::Secret>,
}

/// Serves the admin endpoint on `listener` until the task is dropped.
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<AdminState>>| async move { s.prometheus.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(crate::console::routes())
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

/// Ready when every database answers within 2 s, the broker has not been unavailable for longer
/// than `[admin] broker_unavailable_ms`, no lane has been without an owner for longer than the
/// lease, and no lane's store write (a mark) has been failing for longer than the lease. The body
/// lists what is wrong.
async fn ready(State(s): State<Arc<AdminState>>) -> (StatusCode, String) {
    let problems = futures::future::join_all(s.databases.iter().map(|db| problems(&s, db))).await;
    let problems: Vec<String> = problems.into_iter().flatten().collect();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// What keeps one database's relay from being ready.
async fn problems(s: &AdminState, db: &DatabaseView) -> Vec<String> {
    let mut out = Vec::new();
    let Some(Connected { store, health }) = db.connected.get() else {
        out.push(format!("database {}: not reached yet", db.name));
        return out;
    };
    if let Some(down) = health.broker_unavailable_for().filter(|d| *d >= s.broker_unavailable) {
        out.push(format!(
            "database {}: broker unavailable for {:.0}s (threshold {:.0}s)",
            db.name,
            down.as_secs_f64(),
            s.broker_unavailable.as_secs_f64()
        ));
    }
    for f in health.store_failing().iter().filter(|f| f.for_ >= s.lease_ttl) {
        out.push(format!(
            "database {}: lane {}: store writes failing for {:.0}s (the lease is {:.0}s): {}",
            db.name,
            f.lane,
            f.for_.as_secs_f64(),
            s.lease_ttl.as_secs_f64(),
            f.error
        ));
    }
    let status = match tokio::time::timeout(DB_ANSWER, store.status()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            out.push(format!("database {}: {e}", db.name));
            return out;
        }
        Err(_) => {
            out.push(format!("database {}: no answer within {DB_ANSWER:?}", db.name));
            return out;
        }
    };
    if s.started.elapsed() > s.lease_ttl {
        let now = chrono::Utc::now();
        let ttl = chrono::Duration::from_std(s.lease_ttl).unwrap_or(chrono::Duration::MAX);
        let stale: Vec<String> = status
            .lanes
            .iter()
            // An owned lane's expiry is its lease's end, a released one's its release: either
            // way the lane has had no live owner since (none at all: never owned).
            .filter(|l| l.expires_at.is_none_or(|e| now - e > ttl))
            .map(|l| l.lane.to_string())
            .collect();
        if !stale.is_empty() {
            out.push(format!(
                "database {}: lanes {} without an owner for longer than the lease ({:.0}s)",
                db.name,
                stale.join(", "),
                s.lease_ttl.as_secs_f64()
            ));
        }
    }
    out
}

#[cfg(test)]
mod upkeep_tests {
    use super::*;

    /// The process's resident memory, from `/proc/self/status`.
    fn resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    /// How much the process grows while `samples` histogram samples are recorded, in rounds with
    /// a pause between them, on a recorder that `drained` or not.
    async fn growth(samples: usize, drained: bool) -> u64 {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let upkeep = drained.then(|| keep_drained(recorder.handle(), Duration::from_millis(5)));
        let histogram = metrics::with_local_recorder(&recorder, || metrics::histogram!("outbox_test_seconds"));
        let before = resident_bytes();
        for _ in 0..samples / 100_000 {
            for _ in 0..100_000 {
                histogram.record(0.001);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grown = resident_bytes().saturating_sub(before);
        if let Some(upkeep) = upkeep {
            upkeep.abort();
        }
        grown
    }

    /// Ten million samples (80 MB as kept) leave the process grown by less than a quarter of that
    /// when drained; undrained, by most of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn histogram_samples_are_drained_without_a_scrape() {
        const SAMPLES: usize = 10_000_000;
        let drained = growth(SAMPLES, true).await;
        assert!(
            drained < 20 << 20,
            "drained every 5 ms, the process grew by {drained} bytes"
        );
        let kept = growth(SAMPLES, false).await;
        assert!(
            kept > 40 << 20,
            "undrained, the process grew by only {kept} bytes: the check cannot tell"
        );
    }
}
