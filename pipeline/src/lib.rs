//! # pipeline: the operator CLI of facepipe
//!
//! The `pipeline` binary (`src/main.rs`) is what an operator runs: `apply`,
//! `validate`, `submit`, `status`, `results`, `stats`, `dead-letters`,
//! `sweep`, `serve`, `up`, `eval` and `bench`. This library holds the parts of it that
//! tests call directly.
//!
//! ## Layout
//! - `src/main.rs`: the commands and their arguments.
//! - `src/bench.rs`: `pipeline bench`, the in-process floor and the end-to-end runs, and
//!   the paired comparison of two builds (`--baseline-bin`).
//! - `src/account.rs`: `pipeline bench --account`, CPU per image by process and operation,
//!   from `perf` samples of the whole machine.
//! - `src/scale.rs`: `pipeline bench --scale N`, one large batch watched per tenth, and the
//!   timing of operators' reads against it.
//! - [`processes`]: starting and measuring stage processes (`up`, bench, the tests).
//! - [`eval`]: detection quality on labelled photos (`pipeline eval`).
//! - `tests/`: the integration tests, against a real nats-server and PostgreSQL.
//!
//! The other crates of the workspace, one way down:
//! `facepipe-api` -> `facepipe-control` -> `facepipe-runtime` -> `facepipe-core`;
//! `facepipe-vision` (with `jpeg-region`) beside them, linked only by detect, crop and this CLI.

pub mod eval;
pub mod processes;
