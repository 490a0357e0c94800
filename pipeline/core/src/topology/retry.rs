//! `[retry]`: the Nak delays of transient failures, and the retry horizon they make.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, StageName, Topology, TopologyError};

/// Exponential delay before a transiently failed message is redelivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay after the first failed attempt.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Multiplier per further attempt.
    pub factor: f64,
    /// Upper bound of the delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Random share of the delay added or removed so replicas do not retry in lockstep (0..1).
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), factor: 4.0, max: Duration::from_secs(60), jitter: 0.2 }
    }
}

impl RetryConfig {
    /// The Nak delay after the `delivered`-th failed delivery (1-based), with jitter drawn from `rng`.
    pub fn delay(&self, delivered: u64, rng: &mut impl rand::Rng) -> Duration {
        let raw = self.undithered(delivered).as_secs_f64();
        let jitter = if self.jitter > 0.0 { rng.random_range(-self.jitter..=self.jitter) } else { 0.0 };
        Duration::from_secs_f64((raw * (1.0 + jitter)).clamp(0.0, self.max.as_secs_f64()))
    }

    /// The delay after the `delivered`-th failed delivery, before jitter.
    fn undithered(&self, delivered: u64) -> Duration {
        let exp = self.factor.powi(delivered.saturating_sub(1).min(62) as i32);
        Duration::from_secs_f64((self.base.as_secs_f64() * exp).min(self.max.as_secs_f64()))
    }

    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(self.factor >= 1.0, "retry.factor", "must be at least 1")?;
        ensure((0.0..1.0).contains(&self.jitter), "retry.jitter", "must be in [0, 1)")
    }
}

impl Topology {
    /// Longest time from a message's first delivery to its last retry, over all
    /// stages: `max_deliver` ack waits plus the Nak delays between attempts.
    pub fn retry_horizon(&self) -> Duration {
        StageName::ALL.iter().map(|name| self.retry_horizon_of(*name)).max().unwrap_or_default()
    }

    /// Longest time from a message's first delivery to its last retry at one
    /// stage: past it, no message that stage was given can come back.
    pub fn retry_horizon_of(&self, name: StageName) -> Duration {
        let s = self.stage(name);
        let attempts = s.max_deliver.max(1) as u32;
        let delays: Duration = (1..u64::from(attempts)).map(|n| self.retry.undithered(n).mul_f64(1.0 + self.retry.jitter)).sum();
        s.ack_wait * attempts + delays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let r = RetryConfig { base: Duration::from_secs(1), factor: 2.0, max: Duration::from_secs(5), jitter: 0.0 };
        let mut rng = rand::rng();
        let d: Vec<u64> = (1..=5).map(|n| r.delay(n, &mut rng).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
        let jittered = RetryConfig { jitter: 0.5, ..r };
        for _ in 0..100 {
            let d = jittered.delay(2, &mut rng).as_secs_f64();
            assert!((1.0..=3.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn the_horizon_adds_every_ack_wait_and_delay() {
        let mut t = crate::topology::tests::repo();
        t.retry = RetryConfig { base: Duration::from_secs(1), factor: 2.0, max: Duration::from_secs(60), jitter: 0.0 };
        // detect: 3 attempts of 30 s, and delays of 1 s and 2 s between them.
        assert_eq!(t.retry_horizon_of(StageName::Detect), Duration::from_secs(93));
    }
}
