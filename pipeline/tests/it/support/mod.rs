//! The integration tests' harness: real services, real binaries, real photos.
//!
//! ## Layout
//! - `facepipe_testkit` (re-exported): nats-server on free ports, a fresh PostgreSQL
//!   database per test and a proxy that cuts it, where `../shared` is, the shared models.
//! - [`store`]: an S3 server (s3s-fs) on a free port.
//! - [`deployment`]: the stage binaries (built before first use), `pipeline apply`, a whole
//!   deployment and `pipeline serve`.
//! - [`photos`]: the labelled photos in `../shared`, and ZIPs of them.

pub mod deployment;
pub mod photos;
pub mod store;

pub use deployment::*;
pub use facepipe_testkit::*;
pub use photos::*;
pub use store::*;
