//! The HTTP side of a stage process: Prometheus metrics, liveness and readiness.
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 while the stage is connected and pulling work; 503 while
//!   it waits for a service (NATS, PostgreSQL), starts or shuts down (readiness).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// Whether the stage is ready to take work; set by the runtime.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Marks the stage ready (pulling work) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// True while the stage pulls work.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: PrometheusHandle, health: Arc<Health>) {
    let app = axum::Router::new()
        .route("/metrics", get(|State(e): State<Endpoints>| async move { e.metrics.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(e): State<Endpoints>| async move {
                if e.health.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(Endpoints { metrics, health });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics and health endpoints stopped");
    }
}
