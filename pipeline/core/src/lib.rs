//! # facepipe-core: the typed core of facepipe
//!
//! Everything the other crates agree on: the deployment description, the JSON
//! messages on each subject, the object-key layout, the domain values
//! (priority, statuses, stage names, detectors), how errors are classified for
//! retries, and the names of the metrics. It opens no connection: its only I/O is
//! reading the topology file, the environment's overrides, and the CA file a
//! database URL names (to check it).
//!
//! ## Layout
//! - [`topology`]: `topology.toml`, the typed description of a deployment, a file per
//!   section, with validation and environment overrides.
//! - [`secret`]: passwords and tokens, which are never serialized nor shown.
//! - [`database_url`]: `postgres.url` read into typed settings, its password kept apart.
//! - [`postgres_tls`]: `sslmode` and `sslrootcert` in the PostgreSQL URL, read as libpq reads them.
//! - [`domain`]: priority, image and batch status, detector: the values that cross crates.
//! - [`messages`]: the JSON message of each subject.
//! - [`keys`]: deterministic object keys, ids and `Nats-Msg-Id`s; the one owner of the key layout.
//! - [`error`]: transient or permanent, as each error type classifies itself; an error with its causes.
//! - [`telemetry`]: metric names and buckets, per-step timing, object bytes.

pub mod database_url;
pub mod domain;
pub mod error;
pub mod keys;
pub mod messages;
pub mod postgres_tls;
pub mod secret;
pub mod telemetry;
pub mod topology;
