//! The dashboard's page and assets, embedded in the binary at build time: nothing
//! is read from disk or fetched from elsewhere at run time. The page is plain
//! HTML, CSS and JavaScript (`assets/`), with no build step; it reads the same
//! `/api` endpoints as any client, and signs in through [`crate::session`].

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use super::ApiState;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// Only this origin's scripts, styles and images; no framing (clickjacking).
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'";

/// `/` and `/ui/*`: the page, its assets and the sign-in endpoints, outside the `/api` guard.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route("/ui/app.js", get(|| asset("text/javascript; charset=utf-8", APP_JS)))
        .route("/ui/app.css", get(|| asset("text/css; charset=utf-8", APP_CSS)))
        .route("/ui/session", get(crate::session::session))
        .route("/ui/login", post(crate::session::login))
        .route("/ui/logout", post(crate::session::logout))
}

async fn asset(media_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, media_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
            // A new binary serves new assets at the same paths.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
