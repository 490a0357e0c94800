//! The HTTP API served by `pipeline serve`: the old design's endpoints, with
//! their paths and response shapes, over the new pipeline.
//!
//! ## Layout
//! - [`batches`]: `upload-zip` (streamed to disk, then to the object store),
//!   `add-images`, `status`, paged `results` and crop downloads.
//! - [`queues`]: `queue-stats`, the old queue names mapped onto the stages.
//! - [`guard`]: bearer-token authentication and the per-client upload rate limit.
//! - [`error`]: errors as JSON (`{"success": false, "error": "..."}`).
//!
//! The OpenAPI document (`pipeline/api/openapi.json`, served at `/openapi.json`)
//! describes every route.

pub mod batches;
pub mod error;
pub mod guard;
pub mod queues;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use facepipe_runtime::bus::Bus;
use facepipe_runtime::db::Db;
use facepipe_runtime::store::Store;
use facepipe_core::topology::Topology;

pub use error::ApiError;

/// The OpenAPI document of this API, as kept in the repository.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What every request handler shares.
pub struct ApiState {
    /// The deployment (limits in `[api]`).
    pub topology: Topology,
    /// NATS, for publishing extract jobs and reading queue statistics.
    pub bus: Bus,
    /// The object store: uploads in, crops out.
    pub store: Store,
    /// PostgreSQL: batches and outcomes.
    pub db: Db,
    /// Per-client limit on new batches.
    pub limiter: guard::RateLimiter,
    /// Starting batches, as the CLI does it.
    pub batches: facepipe_control::batches::Batches,
}

impl ApiState {
    /// State for `topology`'s services.
    pub fn new(topology: Topology, bus: Bus, store: Store, db: Db) -> Self {
        let limiter = guard::RateLimiter::new(topology.api.uploads_per_minute);
        let batches = facepipe_control::batches::Batches::new(topology.clone(), bus.clone(), db.clone(), store.clone());
        Self { topology, bus, store, db, limiter, batches }
    }
}

/// Every route: `/api/...` behind the token guard, `/openapi.json` and `/healthz` open.
pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        // The upload streams to disk under its own cap (max_upload_bytes), not the JSON limit.
        .route("/api/batch/upload-zip", post(batches::upload_zip).layer(DefaultBodyLimit::disable()))
        .route("/api/batch/add-images", post(batches::add_images))
        .route("/api/batch/status/{batch_id}", get(batches::status))
        .route("/api/batch/queue-stats", get(queues::queue_stats))
        .route("/api/batch/{batch_id}/results", get(batches::results))
        .route("/api/batch/{batch_id}/crops/{name}", get(batches::crop))
        .layer(DefaultBodyLimit::max(state.topology.api.max_request_bytes))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard::require_token));
    Router::new()
        .merge(api)
        .route("/openapi.json", get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes the
/// requests in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
