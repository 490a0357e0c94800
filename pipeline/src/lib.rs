//! # pipeline: the operator CLI of facepipe
//!
//! The `pipeline` binary (`src/main.rs`) is what an operator runs: `apply`,
//! `validate`, `submit`, `watch`, `status`, `results`, `stats`, `dead-letters`,
//! `sweep`, `serve` and `up`. `eval` and `bench` run `pipeline-lab`
//! (`pipeline/lab`), so this binary links neither OpenCV nor ONNX Runtime. This
//! library holds what the lab and the tests share with it.
//!
//! ## Layout
//! - `src/main.rs`: the commands and their arguments.
//! - [`processes`]: starting and measuring stage processes (`up`, the lab's bench, the tests).
//! - `tests/`: the integration tests, against a real nats-server and PostgreSQL.
//!
//! The other crates of the workspace, one way down (docs/architecture.md has the picture):
//! `facepipe-api` -> `facepipe-control` -> `facepipe-ledger`, `facepipe-runtime` -> `facepipe-core`;
//! `facepipe-archive` under extract and the API; `facepipe-vision` (with `jpeg-region`)
//! linked only by detect, crop and the lab.

pub mod processes;
