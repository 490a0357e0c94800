//! `[stages.extract.params]`: archive limits and image downloads.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};

/// Parameters of the extract stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractParams {
    /// Lower-case file extensions treated as images; other entries are skipped and counted.
    pub image_extensions: Vec<String>,
    /// Largest uncompressed entry accepted, in bytes; bigger entries fail as images.
    pub max_entry_bytes: u64,
    /// Entries written and published concurrently while unpacking.
    pub parallelism: usize,
    /// Archives with more entries are refused as a whole (the batch fails).
    pub max_entries: usize,
    /// Archives whose entries add up to more uncompressed bytes are refused as a whole.
    pub max_total_bytes: u64,
    /// Entries that inflate more than this many times their compressed size fail
    /// as images (decompression bombs); small entries (under 1 MiB) are exempt.
    pub max_compression_ratio: u64,
    /// Longest one download of an image URL may take (connecting included).
    #[serde(with = "humantime_serde")]
    pub download_timeout: Duration,
    /// Redirects followed per image URL; one more fails the image.
    pub max_redirects: usize,
    /// Attempts per image URL on transient failures (timeouts, connection errors, 5xx, 429).
    pub download_attempts: u32,
    /// Lets image URLs reach loopback, private, link-local and reserved addresses.
    /// Off by default: URLs come from API clients, and must not reach services
    /// inside the pipeline's own network (cloud metadata, databases, admin pages).
    pub allow_private_addresses: bool,
}

impl Default for ExtractParams {
    fn default() -> Self {
        Self {
            image_extensions: ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"].map(String::from).to_vec(),
            max_entry_bytes: 100 << 20,
            parallelism: 16,
            max_entries: 2_000_000,
            max_total_bytes: 64 << 30,
            max_compression_ratio: 100,
            download_timeout: Duration::from_secs(30),
            max_redirects: 5,
            download_attempts: 3,
            allow_private_addresses: false,
        }
    }
}

impl ExtractParams {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(self.parallelism >= 1, "stages.extract.params.parallelism", "must be at least 1")?;
        ensure(self.download_attempts >= 1, "stages.extract.params.download_attempts", "must be at least 1")?;
        ensure(self.download_timeout >= Duration::from_millis(100), "stages.extract.params.download_timeout", "must be at least 100ms")
    }
}
