//! # facepipe-ledger: PostgreSQL, the record of every batch and image
//!
//! The broker carries work; PostgreSQL is the ledger. Every image is in it from the
//! moment extract registers it, and its outcome is recorded exactly once. This crate
//! is the pool, the schema, and the queries on it; only the processes that use
//! PostgreSQL link it (extract, persist, the CLI, the API), not detect or crop.
//!
//! ## Layout
//! - [`pool`]: [`Db`], the pool; migrations (`migrations/V<n>__<name>.sql`, run by
//!   refinery under an advisory lock); one connection outside the pool, to create the database.
//! - [`tls`]: the rustls connector every connection goes through (`sslmode`, `sslrootcert`).
//! - [`error`]: [`DbError`], with its cause and whether a retry can help.
//! - [`writes`]: what extract writes (batches and images registered).
//! - [`outcomes`]: outcomes recorded once, a group per statement.
//! - [`batches`]: a batch's progress as operators read it; reopening a failure for a replay.
//! - [`results`]: a batch's per-image outcomes, by keyed page or as a stream.
//! - [`retention`]: what the retention sweeper asks.
//! - [`reconcile`]: what the reconciler asks: batches still running, pending images, re-drives.

pub mod batches;
pub mod error;
pub mod outcomes;
pub mod pool;
pub mod reconcile;
pub mod results;
pub mod retention;
pub mod tls;
pub mod writes;

pub use batches::BatchSummary;
pub use error::DbError;
pub use pool::{connect_one, ensure_database, AdvisoryLock, Db};
pub use reconcile::{ActiveBatch, PendingImage};
pub use results::{ordered_page, ImageResult, PageStart};
pub use retention::{ObjectKind, SWEEP_LOCK};
pub use tls::TlsSetupError;
pub use outcomes::{Progress, Recorded};
pub use writes::NewImage;
