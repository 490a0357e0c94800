//! What every `[stages.<name>]` has: where it reads and writes, its consumer, its
//! processes; and [`StageView`], those settings whatever the stage's parameters.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, is_subject, is_token, CropParams, DetectParams, ExtractParams, PersistParams, StageName, Topology, TopologyError};

/// The four stages, each with its consumer settings and parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stages {
    /// Unpacks ZIPs into originals.
    pub extract: StageConfig<ExtractParams>,
    /// Finds faces.
    pub detect: StageConfig<DetectParams>,
    /// Crops faces.
    pub crop: StageConfig<CropParams>,
    /// Records outcomes.
    pub persist: StageConfig<PersistParams>,
}

/// Settings every stage has: where it reads, where it writes, and its consumer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig<P> {
    /// Subject the stage consumes.
    pub subject: String,
    /// Subject its output goes to (absent for the last stage).
    #[serde(default)]
    pub next: Option<String>,
    /// Durable consumer name shared by every replica of the stage.
    pub durable: String,
    /// How long the server waits for an ack before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Delivery attempts before a message becomes a dead letter.
    pub max_deliver: i64,
    /// Most unacknowledged messages the consumer hands out across all replicas.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// Messages one process works on at once.
    pub concurrency: usize,
    /// How long a stopping process lets in-flight work finish before it Naks it.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Prometheus listen address (`127.0.0.1:9101`); port 0 or absent disables it.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Processes `pipeline up` starts for this stage (unless `--replicas` says otherwise);
    /// elsewhere, as many processes as you start share the stage's consumers.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Larger messages are dead-lettered unread (the pipeline's own are a few hundred
    /// bytes; extract jobs listing URLs are the largest).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// The stage's own parameters.
    #[serde(default)]
    pub params: P,
}

fn default_max_ack_pending() -> i64 {
    1000
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn one() -> usize {
    1
}
fn default_max_message_bytes() -> usize {
    1 << 20
}

/// Borrowed view of a stage's common settings, whatever its parameter type.
#[derive(Debug, Clone, Copy)]
pub struct StageView<'a> {
    /// Input subject.
    pub subject: &'a str,
    /// Output subject.
    pub next: Option<&'a str>,
    /// Durable consumer name.
    pub durable: &'a str,
    /// Ack wait.
    pub ack_wait: Duration,
    /// Delivery attempts.
    pub max_deliver: i64,
    /// Unacknowledged messages across replicas.
    pub max_ack_pending: i64,
    /// In-flight messages per process.
    pub concurrency: usize,
    /// Shutdown deadline.
    pub shutdown_grace: Duration,
    /// Prometheus listen address.
    pub metrics_addr: Option<&'a str>,
    /// Largest message handled.
    pub max_message_bytes: usize,
    /// Processes `pipeline up` starts.
    pub replicas: usize,
}

impl<P> StageConfig<P> {
    fn view(&self) -> StageView<'_> {
        StageView {
            subject: &self.subject,
            next: self.next.as_deref(),
            durable: &self.durable,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            concurrency: self.concurrency,
            shutdown_grace: self.shutdown_grace,
            metrics_addr: self.metrics_addr.as_deref(),
            max_message_bytes: self.max_message_bytes,
            replicas: self.replicas,
        }
    }
}

impl Stages {
    /// The settings common to every stage, by name.
    pub fn get(&self, name: StageName) -> StageView<'_> {
        match name {
            StageName::Extract => self.extract.view(),
            StageName::Detect => self.detect.view(),
            StageName::Crop => self.crop.view(),
            StageName::Persist => self.persist.view(),
        }
    }

    /// Sets a stage's metrics address (`pipeline up`, tests).
    pub fn set_metrics_addr(&mut self, name: StageName, addr: Option<String>) {
        match name {
            StageName::Extract => self.extract.metrics_addr = addr,
            StageName::Detect => self.detect.metrics_addr = addr,
            StageName::Crop => self.crop.metrics_addr = addr,
            StageName::Persist => self.persist.metrics_addr = addr,
        }
    }

    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        let mut seen = std::collections::HashSet::new();
        for name in StageName::ALL {
            let s = self.get(name);
            let key = |field: &str| format!("stages.{name}.{field}");
            ensure(is_subject(s.subject), &key("subject"), "not a valid NATS subject (no wildcards)")?;
            ensure(seen.insert(s.subject), &key("subject"), "two stages consume the same subject")?;
            ensure(is_token(s.durable), &key("durable"), "use letters, digits, '-' or '_'")?;
            ensure(s.concurrency >= 1, &key("concurrency"), "must be at least 1")?;
            ensure(s.max_deliver >= 1, &key("max_deliver"), "must be at least 1")?;
            ensure(s.ack_wait >= Duration::from_secs(1), &key("ack_wait"), "must be at least 1s")?;
            ensure(s.max_message_bytes >= 1024, &key("max_message_bytes"), "must be at least 1024")?;
            ensure(s.replicas <= 64, &key("replicas"), "at most 64 processes per stage on one host")?;
        }
        // The flow must be a path: each stage's `next` is the following stage's subject.
        for pair in StageName::ALL.windows(2) {
            let (from, to) = (self.get(pair[0]), self.get(pair[1]));
            ensure(
                from.next == Some(to.subject),
                &format!("stages.{}.next", pair[0]),
                &format!("must be `{}` (stages.{}.subject)", to.subject, pair[1]),
            )?;
        }
        ensure(self.persist.next.is_none(), "stages.persist.next", "the last stage has no next subject")?;
        self.extract.params.validate()?;
        self.detect.params.validate()?;
        self.crop.params.validate()
    }
}

impl Topology {
    /// The settings common to every stage, by name.
    pub fn stage(&self, name: StageName) -> StageView<'_> {
        self.stages.get(name)
    }
}

#[cfg(test)]
mod tests {
    use crate::topology::tests::repo;

    #[test]
    fn broken_path_is_rejected() {
        let mut t = repo();
        t.stages.detect.next = Some("faces.elsewhere".into());
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("stages.detect.next"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let mut t = repo();
        t.stages.persist.concurrency = 0;
        assert!(t.validate().unwrap_err().to_string().contains("stages.persist.concurrency"));
    }
}
