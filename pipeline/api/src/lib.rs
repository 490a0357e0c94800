//! The HTTP API served by `pipeline serve`: the old design's endpoints, with
//! their paths and response shapes, over the new pipeline.
//!
//! ## Layout
//! - [`batches`]: `upload-zip` (streamed to disk, then to the object store),
//!   `add-images`, `status`, paged `results` and crop downloads.
//! - [`browse`]: the batch list, a batch's failures by reason, one image and its original;
//!   [`listing`]: the queries behind them; [`stored`]: an original or a crop served as data.
//! - [`export`]: a batch's outcomes as one JSON Lines or CSV download.
//! - [`events`]: a batch's progress as server-sent events.
//! - [`queues`]: `queue-stats` (the old queue names mapped onto the stages) and
//!   `stats` (bands, replicas and throughput, live).
//! - [`deadletters`]: list and replay dead letters.
//! - [`guard`]: authentication, the same-origin rule for requests that change
//!   state, the per-client upload rate limit, and the refusal to serve an open
//!   address without a token.
//! - [`dashboard`]: the browser dashboard at `/`, embedded; [`session`]: its
//!   sign-in (a session cookie and a CSRF token); [`csrf`]: the same-origin rule
//!   and the CSRF token check that both the guard and the sign-in use.
//! - [`service`]: `/openapi.json` and `/healthz`.
//! - [`wire`]: every request and response body, as types.
//! - [`openapi`]: the OpenAPI document, generated from the handlers and [`wire`].
//! - [`error`]: errors as JSON (`{"success": false, "error": "..."}`).
//!
//! Routes are registered with their `#[utoipa::path]` annotations, so the
//! document served at `/openapi.json` lists exactly the routes served.

pub mod batches;
pub mod browse;
pub mod csrf;
pub mod dashboard;
pub mod deadletters;
pub mod error;
pub mod events;
pub mod export;
pub mod guard;
pub mod listing;
pub mod openapi;
pub mod queues;
pub mod service;
pub mod session;
pub mod stored;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use facepipe_runtime::bus::Bus;
use facepipe_ledger::Db;
use facepipe_runtime::store::Store;
use facepipe_core::topology::Topology;

pub use error::ApiError;

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
    /// Per-client limit on failed authentications.
    pub auth_failures: guard::AuthFailures,
    /// Starting batches, as the CLI does it.
    pub batches: facepipe_control::batches::Batches,
    /// The OpenAPI document, as served (set when the router is built).
    pub openapi: std::sync::OnceLock<String>,
    /// The dashboard's signed-in browsers.
    pub sessions: session::Sessions,
    /// Completed counts sampled by `stats`, for throughput.
    pub throughput: queues::Throughput,
}

impl ApiState {
    /// State for `topology`'s services.
    pub fn new(topology: Topology, bus: Bus, store: Store, db: Db) -> Self {
        let limiter = guard::RateLimiter::new(topology.api.uploads_per_minute);
        let auth_failures = guard::AuthFailures::new(topology.api.auth_failures_per_minute);
        let batches = facepipe_control::batches::Batches::new(topology.clone(), bus.clone(), db.clone(), store.clone());
        Self {
            topology,
            bus,
            store,
            db,
            limiter,
            auth_failures,
            batches,
            openapi: std::sync::OnceLock::new(),
            sessions: session::Sessions::default(),
            throughput: queues::Throughput::default(),
        }
    }
}

/// Every route: `/api/...` behind the guard; `/openapi.json`, `/healthz` and the
/// dashboard (`/`, `/ui/...`) open.
pub fn router(state: Arc<ApiState>) -> Router {
    let api = api_routes()
        .layer(DefaultBodyLimit::max(state.topology.api.max_request_bytes))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard::require_token));
    let (router, doc) = with_open_routes(api).split_for_parts();
    let doc = openapi::document(doc, state.topology.api.token.is_some());
    let _ = state.openapi.set(doc.to_pretty_json().expect("the OpenAPI document serializes"));
    router
        .merge(dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::require_known_host))
        .layer(axum::middleware::from_fn(guard::common_headers))
        .with_state(state)
}

/// The OpenAPI document of the routes [`router`] serves (`token_required`: a token is configured).
pub fn openapi_document(token_required: bool) -> utoipa::openapi::OpenApi {
    let (_, doc) = with_open_routes(api_routes()).split_for_parts();
    openapi::document(doc, token_required)
}

/// The `/api` routes, each registered with its annotation.
fn api_routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        // The upload streams to disk under its own cap (max_upload_bytes), not the JSON limit.
        .routes(routes!(batches::upload_zip).layer(DefaultBodyLimit::disable()))
        .routes(routes!(batches::add_images))
        .routes(routes!(batches::status))
        .routes(routes!(events::events))
        .routes(routes!(queues::queue_stats))
        .routes(routes!(batches::results))
        .routes(routes!(batches::crop))
        .routes(routes!(browse::list))
        .routes(routes!(browse::failures))
        .routes(routes!(browse::image))
        .routes(routes!(browse::original))
        .routes(routes!(export::export))
        .routes(routes!(queues::stats))
        .routes(routes!(deadletters::list))
        .routes(routes!(deadletters::replay))
}

/// `api` with the open routes and the fallback, in the document's fixed frame.
fn with_open_routes(api: OpenApiRouter<Arc<ApiState>>) -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(api)
        .routes(routes!(service::openapi_json))
        .routes(routes!(service::healthz))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
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
