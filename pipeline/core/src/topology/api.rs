//! `[api]`: the HTTP API served by `pipeline serve`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};
use crate::secret::Secret;

/// The HTTP API (`pipeline serve`): the old design's endpoints and the dashboard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address (`host:port`). Env: `PIPELINE_API_LISTEN`.
    pub listen: String,
    /// Largest ZIP accepted by `upload-zip`, in bytes; a bigger upload gets 413.
    pub max_upload_bytes: u64,
    /// Largest JSON request body, in bytes; a bigger one gets 413.
    pub max_request_bytes: usize,
    /// Most images one `add-images` call may list.
    pub max_images_per_request: usize,
    /// Batches (uploads and image lists) one client address may start per minute; 0: no limit.
    pub uploads_per_minute: u32,
    /// Bearer token every `/api` request must carry; none: no authentication.
    /// Env: `PIPELINE_API_TOKEN` (prefer it to the file). Never serialized nor shown.
    #[serde(skip_serializing)]
    pub token: Option<Secret>,
    /// Serve without a token on an address other than loopback (anyone who can reach
    /// the port can then upload and replay). Without it, `pipeline serve` refuses.
    /// Env: `PIPELINE_API_ALLOW_UNAUTHENTICATED`.
    pub allow_unauthenticated: bool,
    /// Where uploads are spooled before they enter the object store (default: the system's temp dir).
    pub upload_dir: Option<PathBuf>,
    /// Host names (the `Host` header, without its port) the API answers to, beside
    /// loopback names (`localhost`, `*.localhost`) and IP addresses, which it always
    /// answers to; any other is refused with 403, so a page whose name rebinds to this
    /// server's address cannot use it. Empty: no other name without a token; with a
    /// token, any name (the token is what guards it). `["*"]`: any name.
    pub allowed_hosts: Vec<String>,
    /// Failed sign-ins and wrong bearer tokens one client (an IPv4 address, or an IPv6
    /// /64) may make per minute; past them it gets 429 with `Retry-After`, even with the
    /// right token, until its allowance refills. 0: no limit.
    pub auth_failures_per_minute: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_upload_bytes: 5 << 30,
            max_request_bytes: 8 << 20,
            // About 150 bytes per image in the extract job: well under NATS's default 1 MB max_payload.
            max_images_per_request: 5_000,
            uploads_per_minute: 30,
            token: None,
            allow_unauthenticated: false,
            upload_dir: None,
            allowed_hosts: Vec::new(),
            auth_failures_per_minute: 10,
        }
    }
}

impl ApiConfig {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(
            self.listen.parse::<std::net::SocketAddr>().is_ok(),
            "api.listen",
            "must be `host:port` with an IP address, e.g. 127.0.0.1:8080",
        )?;
        ensure(
            self.max_upload_bytes > 0 && self.max_request_bytes > 0 && self.max_images_per_request > 0,
            "api",
            "size limits must be positive",
        )?;
        ensure(self.token.as_ref().is_none_or(|t| !t.expose().is_empty()), "api.token", "must not be empty")?;
        let is_host_name = |h: &String| {
            h == "*" || (!h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') && !h.starts_with('-'))
        };
        ensure(
            self.allowed_hosts.iter().all(is_host_name),
            "api.allowed_hosts",
            "names host names as a browser sends them, without scheme, port or path (`faces.example.com`), or `*`",
        )
    }

    /// Whether a request whose `Host` header names `host` (its port already removed)
    /// is answered: IP addresses and loopback names always; other names when
    /// `allowed_hosts` names them (or `*`), or, with `allowed_hosts` empty, when a token
    /// guards the API.
    pub fn serves_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok();
        if literal || host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        if self.allowed_hosts.is_empty() {
            return self.token.is_some();
        }
        self.allowed_hosts.iter().any(|allowed| allowed == "*" || allowed.trim_end_matches('.').eq_ignore_ascii_case(&host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_token_only_addresses_loopback_names_and_listed_names_are_served() {
        let open = ApiConfig::default();
        for served in ["127.0.0.1", "[::1]", "10.0.0.5", "localhost", "app.localhost", "LOCALHOST."] {
            assert!(open.serves_host(served), "{served}");
        }
        for refused in ["evil.example", "127.0.0.1.nip.io", "localhost.evil.example"] {
            assert!(!open.serves_host(refused), "{refused}");
        }
        let listed = ApiConfig { allowed_hosts: vec!["faces.example.com".into()], ..ApiConfig::default() };
        assert!(listed.serves_host("Faces.Example.com") && !listed.serves_host("evil.example"));
        let token = ApiConfig { token: Some("t".into()), ..ApiConfig::default() };
        assert!(token.serves_host("evil.example"), "a token guards it");
        let token_and_list = ApiConfig { allowed_hosts: vec!["faces.example.com".into()], ..token };
        assert!(!token_and_list.serves_host("evil.example"), "a list is kept with a token too");
        let any = ApiConfig { allowed_hosts: vec!["*".into()], ..ApiConfig::default() };
        assert!(any.serves_host("evil.example"));
    }

    #[test]
    fn allowed_hosts_are_host_names() {
        for bad in ["http://x.example", "x.example:8080", "x.example/path", "", "-x"] {
            let api = ApiConfig { allowed_hosts: vec![bad.into()], ..ApiConfig::default() };
            assert!(api.validate().is_err(), "{bad}");
        }
    }
}
