//! `[retention]`: how long a completed batch's objects are kept.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};

/// How long a completed batch's objects are kept, and how often they are swept
/// (`pipeline sweep`, and `pipeline serve` every `sweep_every`). Unset keeps
/// forever, as before retention existed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep `uploads/<batch>.zip` this long after the batch completes; unset: forever.
    #[serde(with = "humantime_serde")]
    pub uploads: Option<Duration>,
    /// Keep the originals of images with a final outcome (cropped, no face) this long
    /// after their batch completes; `"0s"`: delete them once it completes; unset:
    /// forever. Originals of failed images stay, for replays.
    #[serde(with = "humantime_serde")]
    pub originals: Option<Duration>,
    /// Keep crops this long after their batch completes; unset: forever.
    #[serde(with = "humantime_serde")]
    pub crops: Option<Duration>,
    /// How often `pipeline serve` sweeps, when anything above is set.
    #[serde(with = "humantime_serde")]
    pub sweep_every: Duration,
    /// A local store's staging files (`<key>#<n>`, left by a crash mid-write) older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub staging_age: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { uploads: None, originals: None, crops: None, sweep_every: Duration::from_secs(600), staging_age: Duration::from_secs(3600) }
    }
}

impl RetentionConfig {
    /// True when some object kind has a retention period, so sweeping deletes something.
    pub fn is_set(&self) -> bool {
        self.uploads.is_some() || self.originals.is_some() || self.crops.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(self.sweep_every >= Duration::from_secs(1), "retention.sweep_every", "must be at least 1s")
    }
}
