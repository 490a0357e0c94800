//! Prometheus metrics shared by every stage process: their names, the
//! histogram buckets, per-step timing and object bytes. (The consumer-lag
//! poller, which needs NATS, is `facepipe_runtime::lag`.)
//!
//! Names follow `facepipe_<name>_<unit>`, counters ending in `_total`. Every
//! series carries a `stage` label: the exporter adds it process-wide
//! (`facepipe_runtime::app::init_endpoints`), so code that does not know its stage (the
//! object store, the vision functions) records without it, and a label given
//! explicitly takes its place rather than duplicating it.

use std::time::{Duration, Instant};

use crate::topology::StageName;

/// Counter: messages a stage handled, by `outcome` (see [`Handling`]).
pub const MESSAGES: &str = "facepipe_messages_total";
/// Counter: deliveries after a message's first.
pub const REDELIVERIES: &str = "facepipe_redeliveries_total";
/// Histogram: time from a message's delivery to its ack, Nak or Term.
pub const PROCESSING_SECONDS: &str = "facepipe_processing_seconds";
/// Gauge: messages being handled now.
pub const IN_FLIGHT: &str = "facepipe_in_flight_messages";
/// Counter: faces detect found.
pub const FACES_FOUND: &str = "facepipe_faces_found_total";
/// Counter: work the reconciler published again, by `what` (`image`, `job`).
pub const REDRIVEN: &str = "facepipe_redriven_total";
/// Gauge: batches the reconciler found stalled and has not re-driven yet.
pub const STALLED_BATCHES: &str = "facepipe_stalled_batches";
/// Counter: statements persist recorded outcomes in (outcomes / groups = the mean group).
pub const OUTCOME_GROUPS: &str = "facepipe_outcome_groups_total";
/// Counter: outcomes persist handed to those statements.
pub const GROUPED_OUTCOMES: &str = "facepipe_grouped_outcomes_total";
/// Histogram: time of one step of handling an image, by `step` (see [`Step`]).
pub const STEP_SECONDS: &str = "facepipe_step_seconds";
/// Counter: bytes read from the object store.
pub const OBJECT_READ_BYTES: &str = "facepipe_object_read_bytes_total";
/// Counter: bytes written to the object store.
pub const OBJECT_WRITTEN_BYTES: &str = "facepipe_object_written_bytes_total";
/// Counter: photos detect's second pass decided (YuNet was unsure of them).
pub const SECOND_PASS_IMAGES: &str = "facepipe_second_pass_images_total";
/// Gauge: messages of the stage's stream not yet delivered, per consumer.
pub const CONSUMER_PENDING: &str = "facepipe_consumer_pending_messages";
/// Gauge: messages delivered and not yet acknowledged, per consumer.
pub const CONSUMER_ACK_PENDING: &str = "facepipe_consumer_ack_pending_messages";
/// Gauge: unacknowledged messages delivered more than once, per consumer.
pub const CONSUMER_REDELIVERED: &str = "facepipe_consumer_redelivered_messages";

/// Bucket bounds (seconds) of every histogram: from sub-millisecond object
/// reads to an extract job reading a large archive for minutes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How often the consumer lag is read from JetStream.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// One timed step of handling an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Reading an object from the store.
    Fetch,
    /// Decoding image bytes into pixels.
    Decode,
    /// Running the face detector.
    Detect,
    /// Resizing and JPEG-encoding a crop.
    Encode,
    /// Writing an object to the store.
    Store,
}

impl Step {
    /// The `step` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::Decode => "decode",
            Self::Detect => "detect",
            Self::Encode => "encode",
            Self::Store => "store",
        }
    }

    /// The steps a stage's handler goes through (extract fetches only remote archives).
    pub fn of(stage: StageName) -> &'static [Step] {
        match stage {
            StageName::Extract => &[Self::Fetch, Self::Store],
            StageName::Detect => &[Self::Fetch, Self::Decode, Self::Detect],
            StageName::Crop => &[Self::Fetch, Self::Decode, Self::Encode, Self::Store],
            StageName::Persist => &[],
        }
    }

    /// Starts timing this step; the time is recorded when the timer is dropped,
    /// so a step that fails (returns early with `?`) is timed too.
    pub fn start(self) -> StepTimer {
        StepTimer { step: self, started: Instant::now() }
    }
}

/// Records the time since [`Step::start`] into [`STEP_SECONDS`] on drop.
#[derive(Debug)]
#[must_use = "the step is timed until the timer is dropped"]
pub struct StepTimer {
    step: Step,
    started: Instant,
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        metrics::histogram!(STEP_SECONDS, "step" => self.step.as_str()).record(self.started.elapsed().as_secs_f64());
    }
}

/// Counts `bytes` read from the object store.
pub fn object_read(bytes: u64) {
    metrics::counter!(OBJECT_READ_BYTES).increment(bytes);
}

/// Counts `bytes` written to the object store.
pub fn object_written(bytes: u64) {
    metrics::counter!(OBJECT_WRITTEN_BYTES).increment(bytes);
}

/// Registers the help text and unit of every metric, for the `# HELP` lines
/// and so `/metrics` documents itself.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(MESSAGES, "Messages handled, by outcome.");
    describe_counter!(REDELIVERIES, "Deliveries after the first.");
    describe_histogram!(PROCESSING_SECONDS, Unit::Seconds, "Time from delivery to ack, Nak or Term.");
    describe_gauge!(IN_FLIGHT, "Messages being handled now.");
    describe_counter!(FACES_FOUND, "Faces detected.");
    describe_counter!(REDRIVEN, "Images and extract jobs the reconciler published again, the broker having lost them.");
    describe_gauge!(STALLED_BATCHES, "Batches with images pending and nothing of them in any stream, not yet re-driven.");
    describe_counter!(SECOND_PASS_IMAGES, "Photos decided by detect's second pass (RetinaFace), YuNet being unsure of them.");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Time of one step (fetch, decode, detect, encode, store).");
    describe_counter!(OBJECT_READ_BYTES, Unit::Bytes, "Bytes read from the object store.");
    describe_counter!(OBJECT_WRITTEN_BYTES, Unit::Bytes, "Bytes written to the object store.");
    describe_gauge!(CONSUMER_PENDING, "Messages not yet delivered, per JetStream consumer.");
    describe_gauge!(CONSUMER_ACK_PENDING, "Messages delivered and not yet acknowledged, per JetStream consumer.");
    describe_gauge!(CONSUMER_REDELIVERED, "Unacknowledged messages delivered more than once, per JetStream consumer.");
}

/// How a stage was done with a message: the `outcome` label of [`MESSAGES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Handled, outputs stored, acked.
    Ok,
    /// Its effect was already there (a redelivered outcome); acked.
    Skipped,
    /// Failed transiently; Nak'd with a delay.
    Retried,
    /// Failed for good; dead-lettered, its failure recorded, Term'd.
    DeadLettered,
    /// Handled, but the ack did not reach the server: it will be redelivered.
    AckFailed,
    /// Failed for good, and the dead letter could not be stored: left un-acked.
    DeadLetterFailed,
}

impl Handling {
    /// Every outcome.
    pub const ALL: [Handling; 6] =
        [Self::Ok, Self::Skipped, Self::Retried, Self::DeadLettered, Self::AckFailed, Self::DeadLetterFailed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Skipped => "skipped",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
            Self::AckFailed => "ack_failed",
            Self::DeadLetterFailed => "dead_letter_failed",
        }
    }

    /// Counts one message of `stage` handled this way.
    pub fn count(self, stage: StageName) {
        metrics::counter!(MESSAGES, "stage" => stage.as_str(), "outcome" => self.as_str()).increment(1);
    }
}

/// Creates the stage's counters and histograms at zero, so a series exists
/// before its first event: otherwise Prometheus first sees it at its first
/// value, and `increase()`/`rate()` miss that first step (all of a one-job
/// extract's work). Labels are given in the same order as where the metrics
/// are recorded, so these are the same series, not look-alikes.
pub fn register_zeros(stage_name: StageName) {
    // Registering a histogram handle is enough for it to render with empty buckets.
    for step in Step::of(stage_name) {
        let _ = metrics::histogram!(STEP_SECONDS, "step" => step.as_str());
    }
    let stage = stage_name.as_str();
    let _ = metrics::histogram!(PROCESSING_SECONDS, "stage" => stage);
    for outcome in Handling::ALL {
        metrics::counter!(MESSAGES, "stage" => stage, "outcome" => outcome.as_str()).absolute(0);
    }
    metrics::counter!(REDELIVERIES, "stage" => stage).absolute(0);
    if stage_name == StageName::Detect {
        metrics::counter!(FACES_FOUND, "stage" => stage).absolute(0);
        metrics::counter!(SECOND_PASS_IMAGES, "stage" => stage).absolute(0);
    }
    if stage_name == StageName::Persist {
        // The reconciler runs in persist.
        for what in ["image", "job"] {
            metrics::counter!(REDRIVEN, "what" => what).absolute(0);
        }
        metrics::gauge!(STALLED_BATCHES).set(0.0);
        metrics::counter!(OUTCOME_GROUPS).absolute(0);
        metrics::counter!(GROUPED_OUTCOMES).absolute(0);
    }
    metrics::counter!(OBJECT_READ_BYTES).absolute(0);
    metrics::counter!(OBJECT_WRITTEN_BYTES).absolute(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_buckets_render_as_a_labelled_histogram() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .add_global_label("stage", "detect")
            .set_buckets(SECONDS_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            drop(Step::Decode.start());
            object_read(1234);
            // An explicit stage label replaces the global one instead of duplicating it.
            Handling::Ok.count(StageName::Detect);
        });
        let text = handle.render();
        assert!(text.contains(r#"facepipe_step_seconds_bucket{stage="detect",step="decode",le="0.0005"}"#), "{text}");
        assert!(text.contains(r#"facepipe_object_read_bytes_total{stage="detect"} 1234"#), "{text}");
        assert!(text.contains(r#"facepipe_messages_total{stage="detect",outcome="ok"} 1"#), "{text}");
    }
}
