//! # facepipe-control: the control plane
//!
//! What an operator does to a deployment, written once and called by the
//! `pipeline` CLI, the HTTP API (`facepipe-api`) and bench alike.
//!
//! ## Layout
//! - [`batches`]: starting a batch (ZIP or URL list) and waiting for it.
//! - [`stats`]: each stage's queue and replicas.
//! - [`deadletters`]: listing and replaying dead letters, a page at a time.
//! - [`reconcile`]: re-driving what the broker lost, from PostgreSQL's record of it.
//! - [`retention`]: deleting a completed batch's objects once `[retention]` says they expired.

pub mod batches;
pub mod deadletters;
pub mod reconcile;
pub mod retention;
pub mod stats;
