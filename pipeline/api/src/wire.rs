//! The API's request and response bodies, as types: the handlers answer with
//! these, and the OpenAPI document is generated from them, so the two cannot
//! drift apart. Names are the old design's (camelCase) where it had them.

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use facepipe_core::domain::{BatchStatus, Detector, ImageStatus, Priority, StageName};
use facepipe_core::messages::FaceBox;
use facepipe_ledger::{BatchSummary, ImageResult};

/// An error: `success` is false and `error` says why.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always false.
    pub success: bool,
    /// What went wrong.
    pub error: String,
}

/// A batch was started.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchStarted {
    /// Always true.
    pub success: bool,
    /// The new batch's id.
    pub batch_id: String,
    /// Images in the batch: image entries of the ZIP (from its central directory), or URLs given.
    pub image_count: usize,
    /// Images queued for detection (equal to imageCount).
    pub queued: usize,
    /// A sentence for people.
    pub message: String,
}

/// The multipart form of `upload-zip` (documentation only: the handler streams the parts).
#[derive(ToSchema)]
#[schema(as = UploadZipForm)]
#[allow(dead_code)]
pub struct UploadZipForm {
    /// The ZIP archive of photos.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// Owner of the batch: 1-256 characters, not only spaces.
    #[schema(rename = "projectId", min_length = 1, max_length = 256, pattern = r"\S")]
    project_id: String,
    /// 1 (lowest) to 10 (highest); 5 when absent.
    #[schema(pattern = "^(10|[1-9])$")]
    priority: Option<String>,
}

/// A priority given as a number or as a numeric string, as the old design took it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PriorityInput {
    /// 1-10.
    Number(i64),
    /// "1" to "10".
    Text(String),
}

/// What [`PriorityInput::priority`] accepts, exactly.
const PRIORITY_TEXT: &str = "^(10|[1-9])$";

impl utoipa::PartialSchema for PriorityInput {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)).maximum(Some(10)))
            .item(ObjectBuilder::new().schema_type(Type::String).pattern(Some(PRIORITY_TEXT)))
            .description(Some("1 (lowest) to 10 (highest), a number or a numeric string."))
            .into()
    }
}

impl ToSchema for PriorityInput {}

impl PriorityInput {
    /// The priority, when it is one of 1 to 10, given exactly (no spaces, sign or leading zero).
    pub fn priority(&self) -> Option<Priority> {
        match self {
            Self::Number(n) => Priority::new(*n).ok(),
            Self::Text(s) if s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0') => s.parse().ok(),
            Self::Text(_) => None,
        }
    }
}

/// Body of `add-images`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddImages {
    /// Owner of the batch: 1-256 characters, not only spaces.
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    pub project_id: String,
    /// 1 (lowest) to 10 (highest); 5 when absent or null.
    #[serde(default)]
    pub priority: Option<PriorityInput>,
    /// The images, at least one and at most `api.max_images_per_request` (413 beyond).
    #[schema(min_items = 1)]
    pub images: Vec<ImageUrl>,
}

/// The caller's id for an image, a string or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RecordId {
    /// A string id.
    Text(String),
    /// A numeric id, kept as its decimal text.
    Number(serde_json::Number),
}

impl utoipa::PartialSchema for RecordId {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .description(Some("The caller's id for the image, a string or a number (kept as its decimal text)."))
            .into()
    }
}

impl ToSchema for RecordId {}

/// One image of an `add-images` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageUrl {
    /// The caller's id for the image, kept on its outcome.
    #[serde(default)]
    pub record_id: Option<RecordId>,
    /// The `http` or `https` URL the extract stage downloads.
    #[schema(pattern = "^https?://[^/?#\\s]+")]
    pub image_url: String,
}

/// The answer of `status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusAnswer {
    /// Always true.
    pub success: bool,
    /// The batch.
    pub batch: BatchView,
}

/// A batch's progress, under the old design's names and the new ones.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchView {
    /// The batch id.
    pub id: String,
    /// The batch id again, as the old design named it.
    pub batch_id: String,
    /// Images in the batch; null until extract has read the whole archive.
    pub image_count: Option<i32>,
    /// Images without an outcome yet.
    pub queued: Option<i32>,
    /// Owner.
    pub project_id: String,
    /// 1-10.
    #[schema(value_type = u8, minimum = 1, maximum = 10)]
    pub priority: Priority,
    /// ingesting, processing, completed or failed.
    #[schema(value_type = String)]
    pub status: BatchStatus,
    /// Counts.
    pub progress: ProgressView,
    /// processed / imageCount, 0-100.
    pub progress_percent: f64,
    /// Faces found so far.
    pub faces_found: i32,
    /// Archive entries that were not images.
    pub skipped: i32,
    /// Why the batch failed, when it did.
    pub error: Option<String>,
    /// When the batch was recorded.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When its last image got its outcome.
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Since when images of it are pending with nothing of it in any stream (the broker
    /// lost their messages): the reconciler re-drives them once it stays so for
    /// `reconcile.stalled_after`. Null while it flows, or waits behind a backlog.
    pub stalled_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Images the reconciler published again, in all.
    pub redriven: i32,
}

/// The old design's `progress` object.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressView {
    /// Images with an outcome.
    pub processed: i32,
    /// Images in the batch (null while ingesting).
    pub total: Option<i32>,
    /// Images that failed.
    pub failed: i32,
    /// When the counters last moved.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<BatchSummary> for BatchView {
    fn from(b: BatchSummary) -> Self {
        Self {
            id: b.batch_id.clone(),
            batch_id: b.batch_id,
            image_count: b.image_count,
            queued: b.image_count.map(|n| (n - b.processed).max(0)),
            project_id: b.project_id,
            priority: b.priority,
            status: b.status,
            progress: ProgressView { processed: b.processed, total: b.image_count, failed: b.failed, updated_at: b.updated_at },
            progress_percent: b.progress_percent,
            faces_found: b.faces,
            skipped: b.skipped,
            error: b.error,
            created_at: b.created_at,
            completed_at: b.completed_at,
            stalled_since: b.stalled_since,
            redriven: b.redriven,
        }
    }
}

/// One server-sent event of `GET /api/batch/{batchId}/events`, as an event-stream
/// parser reads it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchEvent {
    /// `status`, or `error` (the stream then ends; reconnect to resume).
    pub event: BatchEventName,
    /// For `status`, the batch as JSON, shaped as `status` answers it under `batch`
    /// (`BatchView`); for `error`, what went wrong.
    pub data: String,
}

/// The names of [`BatchEvent`]s.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BatchEventName {
    /// The batch's status.
    Status,
    /// The stream could not go on.
    Error,
}

/// One page of a batch's outcomes.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultsPage {
    /// Always true.
    pub success: bool,
    /// The batch.
    pub batch_id: String,
    /// The batch's status.
    #[schema(value_type = String)]
    pub status: BatchStatus,
    /// This page, from 1.
    pub page: i64,
    /// Images per page.
    pub page_size: i64,
    /// Images in the batch (null while ingesting).
    pub total: Option<i32>,
    /// Pass as `after` to get the next page; null on the last page.
    pub next_after: Option<String>,
    /// The outcomes, in image order.
    pub results: Vec<ImageView>,
}

/// One image's outcome.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    /// The image's id in its batch.
    pub image_id: String,
    /// The caller's id, for images given by URL.
    pub record_id: Option<String>,
    /// The archive entry or URL.
    pub entry: String,
    /// pending, cropped, no_face or failed.
    #[schema(value_type = String)]
    pub status: ImageStatus,
    /// Upright width in pixels.
    pub width: Option<i32>,
    /// Upright height in pixels.
    pub height: Option<i32>,
    /// The faces found.
    pub faces: Vec<Face>,
    /// One crop per face.
    pub crops: Vec<CropLink>,
    /// Which detector decided the faces: yunet, retinaface (detect's second pass) or haar.
    #[schema(value_type = Option<String>)]
    pub detector: Option<Detector>,
    /// Why the image failed, when it did.
    pub error: Option<String>,
    /// The stage where it failed.
    #[schema(value_type = Option<String>)]
    pub failed_stage: Option<StageName>,
    /// Deliveries it took.
    pub attempts: i32,
}

/// A face box in upright original pixels.
#[derive(Debug, Serialize, ToSchema)]
pub struct Face {
    /// Left edge.
    pub x: f32,
    /// Top edge.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
    /// Detector confidence, 0-1.
    pub score: f32,
}

/// Where a crop is stored and where to download it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CropLink {
    /// Object store key.
    pub key: String,
    /// Download path on this API.
    pub url: String,
}

impl ImageView {
    /// The outcome of one image of `batch_id`, with download links for its crops.
    pub fn new(batch_id: &str, r: ImageResult) -> Self {
        let crops = r
            .crop_keys
            .into_iter()
            .map(|key| {
                let name = key.rsplit('/').next().unwrap_or(&key).to_string();
                CropLink { url: format!("/api/batch/{batch_id}/crops/{name}"), key }
            })
            .collect();
        let faces = r.faces.iter().map(|f: &FaceBox| Face { x: f.x, y: f.y, w: f.w, h: f.h, score: f.score }).collect();
        Self {
            image_id: r.image_id,
            record_id: r.record_id,
            entry: r.entry,
            status: r.status,
            width: r.width,
            height: r.height,
            faces,
            crops,
            detector: r.detector,
            error: r.error,
            failed_stage: r.failed_stage,
            attempts: r.attempts,
        }
    }
}

/// The answer of `queue-stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueStatsAnswer {
    /// Always true.
    pub success: bool,
    /// The old design's own shape, which its monitoring recipes read (`jq .stats.faceDetection.failed`).
    pub stats: OldStats,
    /// The same counts under the old queue names.
    pub queues: std::collections::BTreeMap<String, QueueCounts>,
    /// The same counts under the stage names.
    pub stages: std::collections::BTreeMap<String, QueueCounts>,
}

/// The old design's `stats` object: one entry per old queue, and a timestamp.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OldStats {
    /// The ZIP unpacking queue (now extract).
    pub batch_ingestion: QueueCounts,
    /// The per-image detect-and-crop queue (now detect).
    pub face_detection: QueueCounts,
    /// Crop, split from detection.
    pub face_crop: QueueCounts,
    /// Recording outcomes (now persist).
    pub result_persist: QueueCounts,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// One queue's counts.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueCounts {
    /// Messages waiting.
    pub waiting: u64,
    /// Messages being worked on.
    pub active: usize,
    /// Messages handled.
    pub completed: u64,
    /// Images that failed in this stage.
    pub failed: i64,
    /// Messages waiting to be retried.
    pub delayed: usize,
    /// Pull requests waiting for work.
    pub idle_pullers: usize,
    /// Stage processes connected (they answered a presence ping).
    pub replicas: usize,
}

/// One page of batches, newest first (`GET /api/batches`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchList {
    /// Always true.
    pub success: bool,
    /// The batches.
    pub batches: Vec<BatchRow>,
    /// Pass as `before` to get the next (older) page; null on the last page.
    pub next_before: Option<String>,
}

/// A batch with its pace.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchRow {
    /// The batch, as `status` answers it.
    #[serde(flatten)]
    pub batch: BatchView,
    /// Outcomes per second since the batch was created (until it finished); null before the first.
    pub images_per_second: Option<f64>,
    /// Seconds left at that pace; null when the batch is finished or its size or pace is unknown.
    pub eta_seconds: Option<f64>,
}

impl BatchRow {
    /// `b` with its average pace, measured at `now`.
    pub fn new(b: BatchSummary, now: chrono::DateTime<chrono::Utc>) -> Self {
        // A finished batch's pace stops at its end, not at the time of asking.
        let end = if b.status.is_finished() { b.completed_at.unwrap_or(b.updated_at) } else { now };
        let seconds = (end - b.created_at).num_milliseconds() as f64 / 1000.0;
        let images_per_second = (b.processed > 0 && seconds > 0.0).then(|| b.processed as f64 / seconds);
        let eta_seconds = match (b.status.is_finished(), b.image_count, images_per_second) {
            (false, Some(total), Some(rate)) => Some((total - b.processed).max(0) as f64 / rate),
            _ => None,
        };
        Self { batch: b.into(), images_per_second, eta_seconds }
    }
}

/// A batch's failures, grouped (`GET /api/batch/{batchId}/failures`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroups {
    /// Always true.
    pub success: bool,
    /// The batch.
    pub batch_id: String,
    /// Groups by stage and reason, biggest first (at most 100).
    pub groups: Vec<FailureGroupView>,
}

/// Images that failed at one stage for one reason.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroupView {
    /// The stage that gave up.
    #[schema(value_type = Option<String>)]
    pub stage: Option<StageName>,
    /// The error recorded.
    pub reason: String,
    /// How many images.
    pub count: i64,
    /// The first of them (an image id).
    pub example: String,
}

/// One image (`GET /api/batch/{batchId}/images/{imageId}`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageAnswer {
    /// Always true.
    pub success: bool,
    /// Its outcome.
    pub image: ImageView,
    /// Download path of the original, when one was stored.
    pub original_url: Option<String>,
}

/// Every stage's queue, live (`GET /api/stats`): `pipeline stats`, with the
/// replicas named and the throughput of the last minutes.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsAnswer {
    /// Always true.
    pub success: bool,
    /// When these were read, in Unix milliseconds.
    pub timestamp: u64,
    /// The stages, in flow order.
    pub stages: Vec<StageStats>,
}

/// One stage's queue.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStats {
    /// extract, detect, crop or persist.
    pub stage: String,
    /// Messages not yet delivered.
    pub waiting: u64,
    /// Delivered and not yet acknowledged.
    pub active: usize,
    /// Of those, delivered more than once.
    pub retrying: usize,
    /// Messages taken off the queue since the stream was created.
    pub completed: u64,
    /// Images whose failure this stage recorded.
    pub failed: i64,
    /// Pull requests waiting at the server.
    pub idle_pullers: usize,
    /// `waiting` per priority band.
    pub waiting_by_band: std::collections::BTreeMap<String, u64>,
    /// The processes running the stage.
    pub replicas: Vec<ReplicaView>,
    /// Messages completed per second over the last minute of samples; null until two samples are far enough apart.
    pub per_second: Option<f64>,
    /// `completed` over the last minutes, as sampled by this server while someone asked.
    pub history: Vec<Sample>,
}

/// A process running a stage.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Worker slots.
    pub concurrency: usize,
    /// Messages in hand.
    pub in_flight: usize,
}

/// A stage's `completed` count at one time.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct Sample {
    /// Unix milliseconds.
    pub t: u64,
    /// Messages completed by then.
    pub completed: u64,
}

/// One page of dead letters, oldest first (`GET /api/dead-letters`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterList {
    /// Always true.
    pub success: bool,
    /// The letters.
    pub letters: Vec<DeadLetterView>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<u64>,
}

/// A message a stage gave up on.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// Its id, to replay it by.
    pub id: u64,
    /// The stage that gave up.
    pub stage: String,
    /// The subject it was consumed from, where a replay publishes it.
    pub subject: String,
    /// Why.
    pub error: String,
    /// True when the error was permanent, false when retries ran out.
    pub permanent: bool,
    /// Deliveries made.
    pub attempts: u32,
    /// The batch it names, if any.
    pub batch_id: Option<String>,
    /// The image it names, if any.
    pub image_id: Option<String>,
    /// When the stage gave up.
    pub time: chrono::DateTime<chrono::Utc>,
}

/// What to replay: exactly one of `ids`, `batch` or `all`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// These letters (their ids, from 0; as signed 64-bit numbers, which every id fits).
    #[serde(default)]
    #[schema(value_type = Option<Vec<i64>>)]
    pub ids: Option<Vec<i64>>,
    /// Every letter of this batch.
    #[serde(default)]
    pub batch: Option<String>,
    /// Every letter (must be true).
    #[serde(default)]
    pub all: Option<bool>,
}

/// How many letters were replayed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayAnswer {
    /// Always true.
    pub success: bool,
    /// Letters put back on their subjects.
    pub replayed: usize,
}
