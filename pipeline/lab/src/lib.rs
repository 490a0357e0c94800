//! # facepipe-lab: measuring the pipeline
//!
//! What `pipeline-lab` (and `pipeline eval`, `pipeline bench`, which run it) does,
//! kept out of the operator's CLI, which then links neither OpenCV nor ONNX Runtime.
//!
//! ## Layout
//! - [`eval`]: detection quality on labelled photos (`eval`).
//! - [`bench`]: the in-process floor and the end-to-end runs, and the paired comparison
//!   of two builds (`bench --baseline-bin`).
//! - [`account`]: CPU per image by process and operation, from `perf` samples of the
//!   whole machine (`bench --account`).
//! - [`ledger`]: what the bench asks PostgreSQL (commits, latencies, size).
//! - [`scale`]: one large batch watched per tenth, and the timing of operators' reads
//!   against it (`bench --scale N`).
//! - `src/main.rs`: the `pipeline-lab` binary.

pub mod account;
pub mod bench;
pub mod eval;
pub mod ledger;
pub mod scale;
