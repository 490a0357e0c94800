//! Telling a page's own requests from another site's: the same-origin rule for
//! requests that change state, and the dashboard session's CSRF token. Kept apart
//! from [`crate::guard`] and [`crate::session`], which both use it.

use axum::http::{header, HeaderMap, StatusCode};

use super::ApiError;

/// The header a state-changing request with the session cookie must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Refuses (403) a request a browser sent from another site: a page elsewhere must
/// not be able to upload or replay through a browser that can reach this API, even
/// one on loopback without a token. Clients that are not browsers send neither header.
pub fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let refused = || ApiError::new(StatusCode::FORBIDDEN, "cross-site request refused");
    let text = |name| headers.get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    if matches!(text("sec-fetch-site"), Some("cross-site" | "same-site")) {
        return Err(refused());
    }
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let url = url::Url::parse(origin).map_err(|_| refused())?;
        let origin_host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(refused()),
        };
        // Behind a proxy that rewrites Host, the host the browser asked for is in
        // X-Forwarded-Host (a header another site's page cannot set on a request).
        let ours = [text(header::HOST.as_str()), text("x-forwarded-host")];
        if !ours.into_iter().flatten().any(|host| origin_host.eq_ignore_ascii_case(host)) {
            return Err(refused());
        }
    }
    Ok(())
}

/// True when the request carries `csrf` in [`CSRF_HEADER`] (compared in constant time).
pub fn csrf_matches(headers: &HeaderMap, csrf: &str) -> bool {
    let given = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    constant_time_eq(given.as_bytes(), csrf.as_bytes())
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_same_origin_browsers_may_change_state() {
        use axum::http::HeaderValue;
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(same_origin(&headers(&[])).is_ok(), "curl sends no Origin");
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")])).is_ok());
        assert!(same_origin(&headers(&[("host", "example.org"), ("origin", "https://example.org")])).is_ok());
        let proxied = [("host", "127.0.0.1:8080"), ("x-forwarded-host", "faces.example"), ("origin", "https://faces.example")];
        assert!(same_origin(&headers(&proxied)).is_ok(), "behind a proxy that rewrites Host");
        for bad in [
            headers(&[("host", "127.0.0.1:8080"), ("origin", "http://evil.example")]),
            headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:9090")]),
            headers(&[("host", "127.0.0.1:8080"), ("origin", "null")]),
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
        ] {
            assert_eq!(same_origin(&bad).unwrap_err().status, StatusCode::FORBIDDEN, "{bad:?}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
