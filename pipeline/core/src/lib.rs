//! # facepipe-core: the typed core of facepipe
//!
//! Everything the other crates agree on, with no I/O: the deployment
//! description, the JSON messages on each subject, the object-key layout, the
//! domain values (priority, statuses, stage names, detectors), how errors are
//! classified for retries, and the names of the metrics.
//!
//! ## Layout
//! - [`topology`]: `topology.toml`, the typed description of a deployment, with validation and env overrides.
//! - [`domain`]: priority, image and batch status, detector: the values that cross crates.
//! - [`messages`]: the JSON message of each subject.
//! - [`keys`]: deterministic object keys, ids and `Nats-Msg-Id`s; the one owner of the key layout.
//! - [`retry`]: transient or permanent, as each error type classifies itself.
//! - [`postgres_tls`]: `sslmode` and `sslrootcert` in the PostgreSQL URL, read as libpq reads them.
//! - [`redact`]: hiding credentials in URLs before they are shown.
//! - [`telemetry`]: metric names and buckets, per-step timing, object bytes.

pub mod domain;
pub mod keys;
pub mod messages;
pub mod postgres_tls;
pub mod redact;
pub mod retry;
pub mod telemetry;
pub mod topology;
