//! # facepipe-runtime: what every stage process runs on
//!
//! The connections (NATS, the object store) and the stage runtime that owns the
//! delivery semantics, so that a stage is only a [`Handler`]:
//! pull as many messages as there are free slots, ack after the outputs are
//! stored, retry transient failures with a delay, dead-letter permanent ones,
//! and shut down gracefully. PostgreSQL is not here: the stages that record to it
//! (extract, persist) link `facepipe-ledger` themselves.
//!
//! ## Layout
//! - [`error`]: [`StageError`], a retry classification and its cause.
//! - [`bus`]: NATS connection, stream/consumer plan and apply, acknowledged publishing.
//! - [`store`]: the object store (`file://`, `s3://`).
//! - [`scratch`]: temporary files a restarted process can clean up after a crash.
//! - [`bands`]: weighted pulling from a stage's priority bands.
//! - [`live`]: live reconfiguration through a key-value bucket that running stages watch.
//! - [`ctx`]: [`Ctx`], what a handler is given: topology, connections, CPU threads.
//! - [`cpu`]: the fixed set of CPU threads blocking image work runs on.
//! - [`handler`]: the [`Handler`] trait a stage implements.
//! - [`worker`]: the pull loop: ack, retry, dead letters, graceful shutdown.
//! - [`presence`]: stage processes answer pings, so stats count the replicas connected.
//! - [`health`]: the `/metrics`, `/healthz` and `/readyz` endpoints of a stage process.
//! - [`lag`]: consumer-lag gauges.
//! - [`app`]: start-up shared by every stage binary.
//! - `faults` (feature `fault-injection`, tests only): crash or stall on a marked message.

pub mod app;
pub mod bands;
pub mod bus;
pub mod cpu;
pub mod ctx;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod handler;
pub mod health;
pub mod lag;
pub mod live;
pub mod presence;
pub mod scratch;
pub mod store;
pub mod worker;

pub use ctx::Ctx;
pub use error::{ErrorKind, StageError};
pub use handler::{Delivery, Failed, Handled, Handler};
