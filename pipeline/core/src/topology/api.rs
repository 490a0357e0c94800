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
        ensure(self.token.as_ref().is_none_or(|t| !t.expose().is_empty()), "api.token", "must not be empty")
    }
}
