//! The dashboard's sign-in: the token is given once, and the browser then holds
//! a session cookie (HttpOnly, SameSite=Strict) instead of the token. Every
//! request that changes state with that cookie must also carry the session's
//! CSRF token in `X-CSRF-Token`, which a page on another site cannot read.
//!
//! Sessions live in this process's memory: a restart signs everyone out, which
//! for a token-guarded operator page is the safe way round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cookie::{Cookie, SameSite};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::csrf::{constant_time_eq, csrf_matches, same_origin};

/// The session cookie's name.
pub const COOKIE: &str = "facepipe_session";

/// How long a session lasts.
const TTL: Duration = Duration::from_secs(12 * 60 * 60);

/// Most sessions kept; past it the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// The signed-in browsers: session id to its CSRF token.
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

#[derive(Debug)]
struct Session {
    csrf: String,
    expires: Instant,
}

/// 32 random bytes as hex: unguessable session ids and CSRF tokens.
fn random_hex() -> String {
    use std::fmt::Write;
    rand::random::<[u8; 32]>().iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl Sessions {
    /// A new session: its id (for the cookie) and its CSRF token.
    fn open(&self) -> (String, String) {
        let (id, csrf) = (random_hex(), random_hex());
        let mut by_id = self.by_id.lock().expect("no panics while held");
        let now = Instant::now();
        by_id.retain(|_, s| s.expires > now);
        if by_id.len() >= MAX_SESSIONS {
            if let Some(oldest) = by_id.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                by_id.remove(&oldest);
            }
        }
        by_id.insert(id.clone(), Session { csrf: csrf.clone(), expires: now + TTL });
        (id, csrf)
    }

    /// The CSRF token of the live session the request's cookie names.
    pub fn csrf_of(&self, headers: &HeaderMap) -> Option<String> {
        let id = session_id(headers)?;
        let by_id = self.by_id.lock().expect("no panics while held");
        by_id.get(&id).filter(|s| s.expires > Instant::now()).map(|s| s.csrf.clone())
    }

    fn close(&self, headers: &HeaderMap) {
        if let Some(id) = session_id(headers) {
            self.by_id.lock().expect("no panics while held").remove(&id);
        }
    }
}

/// The session id in the request's cookies.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

/// What the dashboard learns at start.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAnswer {
    /// A token is configured: sign in before anything else.
    pub token_required: bool,
    /// This browser may use the API (signed in, or no token is needed).
    pub signed_in: bool,
    /// Send as `X-CSRF-Token` on every request that changes state; null without a session.
    pub csrf: Option<String>,
}

/// `GET /ui/session`: whether this browser must sign in.
pub async fn session(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Json<SessionAnswer> {
    let token_required = state.topology.api.token.is_some();
    let csrf = state.sessions.csrf_of(&headers);
    Json(SessionAnswer { token_required, signed_in: !token_required || csrf.is_some(), csrf })
}

/// The sign-in form's body.
#[derive(Debug, Deserialize)]
pub struct Login {
    /// The API token.
    pub token: String,
}

/// `POST /ui/login` with `{"token": ".."}`: sets the session cookie and answers the CSRF token.
pub async fn login(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<Login>, JsonRejection>,
) -> Result<Response, ApiError> {
    same_origin(&headers)?;
    let Json(login) = body?;
    let Some(expected) = &state.topology.api.token else {
        return Ok(Json(SessionAnswer { token_required: false, signed_in: true, csrf: None }).into_response());
    };
    // Too many wrong tokens from this client: refused, the right one too, for a while.
    state.auth_failures.refuse_while_blocked(peer.ip())?;
    if !constant_time_eq(login.token.as_bytes(), expected.expose().as_bytes()) {
        state.auth_failures.failed(peer.ip(), "a dashboard sign-in with a wrong token")?;
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong token"));
    }
    let (id, csrf) = state.sessions.open();
    let cookie = Cookie::build((COOKIE, id))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .secure(behind_https(&headers))
        .max_age(cookie::time::Duration::seconds(TTL.as_secs() as i64));
    let answer = Json(SessionAnswer { token_required: true, signed_in: true, csrf: Some(csrf) });
    Ok(with_cookie(answer.into_response(), &cookie.build()))
}

/// `POST /ui/logout`: ends the session (with its CSRF token) and clears the cookie.
pub async fn logout(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    same_origin(&headers)?;
    if let Some(csrf) = state.sessions.csrf_of(&headers) {
        if !csrf_matches(&headers, &csrf) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "missing or wrong X-CSRF-Token"));
        }
        state.sessions.close(&headers);
    }
    let gone = Cookie::build((COOKIE, "")).http_only(true).same_site(SameSite::Strict).path("/").max_age(cookie::time::Duration::ZERO);
    Ok(with_cookie(StatusCode::NO_CONTENT.into_response(), &gone.build()))
}

/// A TLS-terminating proxy in front says so; the cookie is then marked Secure.
fn behind_https(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn with_cookie(mut response: Response, cookie: &Cookie<'_>) -> Response {
    if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csrf::CSRF_HEADER;

    #[test]
    fn a_session_is_found_by_its_cookie_and_ends_on_close() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.open();
        assert_eq!((id.len(), csrf.len()), (64, 64));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&format!("other=1; {COOKIE}={id}")).unwrap());
        assert_eq!(sessions.csrf_of(&headers).as_deref(), Some(csrf.as_str()));
        assert!(!csrf_matches(&headers, &csrf), "the cookie alone is not the CSRF token");
        headers.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
        assert!(csrf_matches(&headers, &csrf));
        sessions.close(&headers);
        assert_eq!(sessions.csrf_of(&headers), None);
        let mut stranger = HeaderMap::new();
        stranger.insert(header::COOKIE, HeaderValue::from_static("facepipe_session=guess"));
        assert_eq!(sessions.csrf_of(&stranger), None);
    }
}
