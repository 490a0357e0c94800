//! # pipeline: the shared library of the face-crop pipeline
//!
//! A batch of photos (a ZIP) flows through four stage binaries connected by
//! NATS JetStream subjects:
//!
//! ```text
//! faces.extract -> [extract] -> faces.detect -> [detect] -> faces.crop -> [crop] -> faces.persist -> [persist]
//!   ZIP job          originals     image refs     face boxes   boxes         crops     outcomes        PostgreSQL
//! ```
//!
//! Messages carry object-store keys, never image bytes. Each stage consumes
//! through one durable pull consumer shared by all its replicas; delivery is
//! at-least-once and every effect is idempotent, so the end state after any
//! number of redeliveries equals that of one clean run.
//!
//! ## Layout
//! - [`topology`]: `topology.toml`, the typed description of a deployment.
//! - [`messages`]: the JSON message of each subject.
//! - [`keys`]: deterministic object keys, ids and `Nats-Msg-Id`s.
//! - [`bus`]: NATS connection, stream/consumer plan and apply, acknowledged publishing.
//! - [`store`]: the object store (`file://`, `s3://`).
//! - [`db`]: PostgreSQL pool, migrations and the idempotent queries.
//! - [`deadletters`]: listing and replaying dead letters.
//! - [`scratch`]: temporary files a restarted process can clean up after a crash.
//! - [`bands`]: weighted pulling from a stage's priority bands.
//! - [`live`]: live reconfiguration through a key-value bucket that running stages watch.
//! - [`presence`]: stage processes answer pings, so stats count the replicas connected.
//! - [`runtime`]: the stage runtime (pull, ack, retry, dead letters, graceful shutdown).
//! - [`app`]: start-up shared by every stage binary.
//! - [`archive`]: reading a ZIP entry by entry with bounded memory.
//! - [`download`]: fetching images given by URL, with time, size and redirect limits.
//! - [`api`]: the HTTP API (`pipeline serve`), the old design's endpoints.
//! - [`vision`]: OpenCV decoding, detection and cropping.
//! - [`error`]: the transient/permanent classification of stage errors.
//! - [`eval`]: detection quality on labelled photos (`pipeline eval`).
//! - [`health`]: the `/metrics`, `/healthz` and `/readyz` endpoints of a stage process.
//! - [`telemetry`]: metric names and buckets, per-step timing, object bytes, consumer lag.
//!
//! The operator CLI (`pipeline apply | submit | status | results | up`) is
//! `src/bin/pipeline.rs`; the stage binaries live in `stages/`.

pub mod api;
pub mod app;
pub mod archive;
pub mod bands;
pub mod bus;
pub mod db;
pub mod deadletters;
pub mod download;
pub mod error;
pub mod eval;
pub mod health;
pub mod keys;
pub mod live;
pub mod messages;
pub mod presence;
pub mod runtime;
pub mod scratch;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod vision;

pub use error::{ErrorKind, StageError};
