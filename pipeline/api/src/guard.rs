//! Request guards: authentication (bearer token or dashboard session), the
//! same-origin rule for requests that change state, the per-client upload rate
//! limit, and the refusal to serve an open address without a token.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::{ApiError, ApiState};
use crate::csrf::constant_time_eq;

/// Guards `/api`: a request that changes state must come from this origin
/// (CSRF), and when a token is configured every request needs it, as a bearer
/// token or as the dashboard's session cookie plus its CSRF token.
pub async fn require_token(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Result<Response, ApiError> {
    let changes_state = !request.method().is_safe();
    if changes_state {
        crate::csrf::same_origin(request.headers())?;
    }
    if let Some(expected) = &state.topology.api.token {
        let headers = request.headers();
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match (given, state.sessions.csrf_of(headers)) {
            (Some(given), _) if constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) => {}
            // A cookie travels with any request the browser makes, so it alone cannot change state.
            (_, Some(csrf)) if changes_state && !crate::csrf::csrf_matches(headers, &csrf) => {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "missing or wrong X-CSRF-Token"));
            }
            (_, Some(_)) => {}
            _ => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")),
        }
    }
    Ok(next.run(request).await)
}

/// Per client address: `per_minute` batches, refilled evenly (GCRA, from `governor`).
pub struct RateLimiter {
    per_minute: u32,
    /// None when unlimited.
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("per_minute", &self.per_minute).finish()
    }
}

/// How many client addresses are remembered before those whose allowance has refilled are forgotten.
const REMEMBERED_CLIENTS: usize = 100_000;

impl RateLimiter {
    /// A limiter allowing `per_minute` batches per client (0: unlimited).
    pub fn new(per_minute: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|n| governor::RateLimiter::keyed(Quota::per_minute(n)));
        Self { per_minute, limiter }
    }

    /// Takes one batch's allowance for `client`, or says (429) how long to wait for one.
    pub fn check(&self, client: IpAddr) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if limiter.len() > REMEMBERED_CLIENTS {
            // Clients whose allowance has refilled are indistinguishable from new ones.
            limiter.retain_recent();
        }
        let refused = match limiter.check_key(&client) {
            Ok(()) => return Ok(()),
            Err(refused) => refused,
        };
        let wait = refused.wait_time_from(DefaultClock::default().now());
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("more than {} batches a minute from {client}; try again later", self.per_minute),
        );
        error.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_refuses_with_a_retry_after() {
        let limiter = RateLimiter::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_ok());
        let refused = limiter.check(a).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.retry_after.unwrap() >= 1);
        assert!(limiter.check(b).is_ok(), "clients have their own buckets");
        assert!(RateLimiter::new(0).check(a).is_ok());
    }

}

/// Who can reach an API listening without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// A token is set, or the address is loopback: nothing to say.
    Guarded,
    /// No token on a non-loopback address, allowed by `api.allow_unauthenticated`: say so loudly.
    OpenByChoice,
}

/// `pipeline serve` without a token on an address others can reach.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to serve {addr} without a token: anyone who can reach it could upload, download URLs and replay. \
     Set PIPELINE_API_TOKEN (or api.token), listen on 127.0.0.1, or set api.allow_unauthenticated = true \
     (env PIPELINE_API_ALLOW_UNAUTHENTICATED=true) to serve it open"
)]
pub struct UnguardedError {
    /// The address asked for.
    pub addr: std::net::SocketAddr,
}

/// Whether the API may listen on `addr` with these settings: a token, a loopback
/// address, or `allow_unauthenticated` (which the caller should warn about).
pub fn exposure(addr: std::net::SocketAddr, api: &facepipe_core::topology::ApiConfig) -> Result<Exposure, UnguardedError> {
    // A v4-mapped loopback (::ffff:127.0.0.1) is loopback too.
    let loopback = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        ip => ip.is_loopback(),
    };
    if api.token.is_some() || loopback {
        Ok(Exposure::Guarded)
    } else if api.allow_unauthenticated {
        Ok(Exposure::OpenByChoice)
    } else {
        Err(UnguardedError { addr })
    }
}

#[cfg(test)]
mod exposure_tests {
    use super::*;
    use facepipe_core::topology::ApiConfig;

    #[test]
    fn only_a_token_loopback_or_an_explicit_choice_may_serve() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let open = ApiConfig::default();
        for guarded in ["127.0.0.1:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080", "127.0.0.2:80"] {
            assert_eq!(exposure(addr(guarded), &open).unwrap(), Exposure::Guarded, "{guarded}");
        }
        for exposed in ["0.0.0.0:8080", "[::]:8080", "192.168.1.5:8080"] {
            let e = exposure(addr(exposed), &open).unwrap_err();
            assert!(e.to_string().contains("PIPELINE_API_TOKEN"), "{e}");
        }
        let token = ApiConfig { token: Some("t".into()), ..ApiConfig::default() };
        assert_eq!(exposure(addr("0.0.0.0:8080"), &token).unwrap(), Exposure::Guarded);
        let chosen = ApiConfig { allow_unauthenticated: true, ..ApiConfig::default() };
        assert_eq!(exposure(addr("0.0.0.0:8080"), &chosen).unwrap(), Exposure::OpenByChoice);
    }
}
