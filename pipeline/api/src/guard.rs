//! Request guards: the `Host` a request may name (DNS rebinding), authentication
//! (bearer token or dashboard session) with a limit on failed attempts, the
//! same-origin rule for requests that change state, the per-client upload rate
//! limit, the refusal to serve an open address without a token, and the headers
//! every answer carries.
//!
//! A client is its IPv4 address, or its IPv6 /64: one host on IPv6 usually holds a
//! whole /64, and would otherwise get a fresh allowance from every address of it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use super::{ApiError, ApiState};
use crate::csrf::constant_time_eq;

/// The client a request counts against: an IPv4 address, or an IPv6 address's /64
/// (an IPv4-mapped IPv6 address is its IPv4 address).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
        v4 => v4,
    }
}

/// Guards every route: the `Host` a request names must be one this server answers to
/// ([`facepipe_core::topology::ApiConfig::serves_host`]), so a page whose name was made
/// to resolve to this server (DNS rebinding) is refused before it reads or writes
/// anything. `X-Forwarded-Host` is not read here: a rebinding page is same-origin, and
/// may set it.
pub async fn require_known_host(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Result<Response, ApiError> {
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Some(host) = host {
        let name = host_name(&host);
        if !state.topology.api.serves_host(name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this server does not answer to the host name `{name}`: use its address, or name it in api.allowed_hosts"),
            ));
        }
    }
    Ok(next.run(request).await)
}

/// The host of a `Host` header, without its port (`[::1]:8080` -> `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(name, _)| name)
}

/// Headers every answer carries: no content sniffing (a stored file is never run as
/// what it is not).
pub async fn common_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Guards `/api`: a request that changes state must come from this origin
/// (CSRF), and when a token is configured every request needs it, as a bearer
/// token or as the dashboard's session cookie plus its CSRF token. A client that
/// failed too often is refused for a while, even with the right token.
pub async fn require_token(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let changes_state = !request.method().is_safe();
    if changes_state {
        crate::csrf::same_origin(request.headers())?;
    }
    if let Some(expected) = &state.topology.api.token {
        state.auth_failures.refuse_while_blocked(peer.ip())?;
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
            (given, None) => {
                let what = if given.is_some() { "a wrong bearer token" } else { "no bearer token" };
                state.auth_failures.failed(peer.ip(), what)?;
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
            }
        }
    }
    Ok(next.run(request).await)
}

/// Failed authentications (wrong bearer tokens, wrong sign-ins) per client: past
/// `per_minute` the client is refused with 429 and `Retry-After` until its allowance
/// refills, whatever it sends. The warnings they cause are limited too, so a flood of
/// guesses cannot flood the log.
pub struct AuthFailures {
    /// None when unlimited.
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Clients refused, and until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Warnings about failures: a few a minute.
    warnings: DefaultDirectRateLimiter,
    /// Failures since the last warning.
    unlogged: AtomicU64,
}

/// Warnings about failed authentications per minute, for the whole server.
const AUTH_WARNINGS_PER_MINUTE: u32 = 6;

impl std::fmt::Debug for AuthFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailures").field("limited", &self.limiter.is_some()).finish()
    }
}

impl AuthFailures {
    /// `per_minute` failures allowed per client (0: unlimited).
    pub fn new(per_minute: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|n| governor::RateLimiter::keyed(Quota::per_minute(n)));
        let warnings = governor::RateLimiter::direct(Quota::per_minute(NonZeroU32::new(AUTH_WARNINGS_PER_MINUTE).expect("not zero")));
        Self { limiter, blocked: Mutex::new(HashMap::new()), warnings, unlogged: AtomicU64::new(0) }
    }

    /// 429, with how long to wait, while `client` is refused.
    pub fn refuse_while_blocked(&self, client: IpAddr) -> Result<(), ApiError> {
        let key = client_key(client);
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("no panics while held");
        match blocked.get(&key) {
            Some(until) if *until > now => Err(too_many_failures(*until - now)),
            Some(_) => {
                blocked.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failure of `client` (`what` it sent); 429 when this one used up its allowance.
    pub fn failed(&self, client: IpAddr, what: &str) -> Result<(), ApiError> {
        let key = client_key(client);
        self.warn(key, what);
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if limiter.len() > REMEMBERED_CLIENTS {
            limiter.retain_recent();
        }
        let Err(refused) = limiter.check_key(&key) else { return Ok(()) };
        let wait = refused.wait_time_from(DefaultClock::default().now()).max(Duration::from_secs(1));
        let mut blocked = self.blocked.lock().expect("no panics while held");
        if blocked.len() > REMEMBERED_CLIENTS {
            let now = Instant::now();
            blocked.retain(|_, until| *until > now);
        }
        blocked.insert(key, Instant::now() + wait);
        Err(too_many_failures(wait))
    }

    fn warn(&self, client: IpAddr, what: &str) {
        if self.warnings.check().is_ok() {
            let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(%client, unlogged, "refused {what} (and {unlogged} other failed authentications not logged one by one)");
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn too_many_failures(wait: Duration) -> ApiError {
    let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many failed authentications from this client; try again later");
    error.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
    error
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

    /// Takes one batch's allowance for `client` (its IPv4 address or IPv6 /64), or says
    /// (429) how long to wait for one.
    pub fn check(&self, client: IpAddr) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let client = client_key(client);
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

    #[test]
    fn an_ipv6_client_is_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), client_key(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(client_key(ip("2001:db8:1:2::1")), client_key(ip("2001:db8:1:3::1")));
        assert_eq!(client_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let limiter = RateLimiter::new(1);
        assert!(limiter.check(ip("2001:db8::1")).is_ok());
        assert!(limiter.check(ip("2001:db8::2")).is_err(), "another address of the same /64 shares its allowance");
    }

    #[test]
    fn failures_past_the_allowance_block_the_client_even_with_the_right_token() {
        let failures = AuthFailures::new(3);
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            failures.refuse_while_blocked(a).unwrap();
            failures.failed(a, "a wrong token").unwrap();
        }
        let refused = failures.failed(a, "a wrong token").unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.retry_after.unwrap() >= 1);
        assert_eq!(failures.refuse_while_blocked(a).unwrap_err().status, StatusCode::TOO_MANY_REQUESTS, "blocked whatever it sends");
        assert!(failures.refuse_while_blocked(b).is_ok(), "others are not");
    }

    #[test]
    fn a_host_header_loses_its_port() {
        assert_eq!(host_name("evil.example:18993"), "evil.example");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("localhost"), "localhost");
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
