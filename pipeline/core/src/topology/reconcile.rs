//! `[reconcile]`: re-driving work the broker lost, from PostgreSQL's record of it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, Topology, TopologyError};

/// The reconciler: PostgreSQL records every image from the moment it is registered;
/// a batch with pending images of which no stage's stream holds anything any more,
/// idle for `stalled_after`, gets its images' jobs published again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Whether persist runs the reconciler (one process at a time, under a PostgreSQL
    /// advisory lock). `pipeline reconcile` runs it by hand either way.
    pub enabled: bool,
    /// How long a batch with pending images and nothing left in any stream must stay
    /// unchanged before they are re-driven. Unset: the topology's retry horizon (the
    /// longest legitimate time a message of any stage can be in flight: `max_deliver`
    /// ack waits and the retry delays between them). Env: `PIPELINE_RECONCILE_STALLED_AFTER`.
    #[serde(with = "humantime_serde")]
    pub stalled_after: Option<Duration>,
    /// How often the reconciler looks.
    #[serde(with = "humantime_serde")]
    pub every: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self { enabled: true, stalled_after: None, every: Duration::from_secs(30) }
    }
}

impl ReconcileConfig {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(self.every >= Duration::from_secs(1), "reconcile.every", "must be at least 1s")?;
        ensure(self.stalled_after.is_none_or(|d| d >= Duration::from_secs(1)), "reconcile.stalled_after", "must be at least 1s")
    }
}

impl Topology {
    /// How long a batch with nothing left in the streams must stay unchanged before its
    /// pending images are re-driven: `reconcile.stalled_after`, else the retry horizon.
    pub fn stalled_after(&self) -> Duration {
        self.reconcile.stalled_after.unwrap_or_else(|| self.retry_horizon())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::repo;

    #[test]
    fn by_default_a_batch_waits_out_every_legitimate_retry_before_a_redrive() {
        let mut t = repo();
        assert_eq!(t.stalled_after(), t.retry_horizon());
        assert!(t.stalled_after() > Duration::from_secs(10 * 60), "the repository's extract retries for over ten minutes");
        t.apply_env(|k| (k == "PIPELINE_RECONCILE_STALLED_AFTER").then(|| "5s".into())).unwrap();
        assert_eq!(t.stalled_after(), Duration::from_secs(5));
        let err = t.apply_env(|k| (k == "PIPELINE_RECONCILE_STALLED_AFTER").then(|| "soon".into())).unwrap_err();
        assert!(err.to_string().contains("PIPELINE_RECONCILE_STALLED_AFTER"), "{err}");
    }
}
