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
    /// Set when the stage refuses to serve at all (its configuration cannot work).
    refused: std::sync::Mutex<Option<String>>,
    /// Why the stage is not ready for now (a service it needs does not answer).
    waiting_for: std::sync::Mutex<Option<String>>,
    /// Something the stage serves without, which readiness mentions (a part of its configuration it runs without).
    degraded: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// Marks the stage ready (pulling work) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        if ready {
            *self.waiting_for.lock().expect("health lock") = None;
        }
    }

    /// Ready, or not ready because of `why` (a service it waits for), which `/readyz` shows.
    pub fn set_services(&self, services: Result<(), String>) {
        match services {
            Ok(()) => self.set_ready(true),
            Err(why) => {
                self.set_ready(false);
                *self.waiting_for.lock().expect("health lock") = Some(why);
            }
        }
    }

    /// True while the stage pulls work.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Marks the stage as refusing to serve, for `reason`: `/readyz` answers 503 with it.
    pub fn refuse(&self, reason: String) {
        self.set_ready(false);
        *self.refused.lock().expect("health lock") = Some(reason);
    }

    /// Notes that the stage serves without something its configuration names, for
    /// `reason`: `/readyz` still answers 200, and says so.
    pub fn degrade(&self, reason: String) {
        *self.degraded.lock().expect("health lock") = Some(reason);
    }

    /// What `/readyz` answers: its status and a one-line body.
    pub fn readiness(&self) -> (StatusCode, String) {
        if let Some(reason) = self.refused.lock().expect("health lock").as_ref() {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"));
        }
        if self.is_ready() {
            match self.degraded.lock().expect("health lock").as_ref() {
                Some(reason) => (StatusCode::OK, format!("ready, without {reason}\n")),
                None => (StatusCode::OK, "ready\n".to_string()),
            }
        } else {
            match self.waiting_for.lock().expect("health lock").as_ref() {
                Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: waiting: {why}\n")),
                None => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
            }
        }
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
            get(|State(e): State<Endpoints>| async move { e.health.readiness() }),
        )
        .with_state(Endpoints { metrics, health });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics and health endpoints stopped");
    }
}
