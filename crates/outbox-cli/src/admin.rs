//! The admin HTTP endpoint: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox::Store;

struct AdminState {
    prometheus: PrometheusHandle,
    store: Arc<dyn Store>,
}

/// Serves the admin endpoint on `listener` until the task is dropped.
pub(crate) async fn serve(listener: tokio::net::TcpListener, prometheus: PrometheusHandle, store: Arc<dyn Store>) {
    let state = Arc::new(AdminState { prometheus, store });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<AdminState>>| async move { s.prometheus.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

/// Ready when the database answers within 2 s.
async fn ready(State(s): State<Arc<AdminState>>) -> (StatusCode, &'static str) {
    match tokio::time::timeout(Duration::from_secs(2), s.store.live_owners()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}
