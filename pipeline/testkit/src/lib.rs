//! # facepipe-testkit: real services for the tests
//!
//! Nothing here is a stand-in: the tests of the stage crates and the integration
//! tests (`pipeline/tests/it`) start a real nats-server on a free port, create a real
//! PostgreSQL database of their own, and read the real photos and models of `../shared`.
//! A dev-dependency only.
//!
//! ## Layout
//! - [`servers`]: nats-server (one or a cluster) on free ports, stopped by PID; port,
//!   process and plain-HTTP helpers.
//! - [`database`]: a fresh database per test (dropped after it), one connection through the
//!   pipeline's own connector, and a proxy that cuts the database without stopping it.
//! - [`stage`]: one stage's handler on a real nats-server, as the runtime runs it.
//! - [`netns`]: test hosts in network namespaces of the test's own, to cut and join again.
//! - this file: where the repository and `../shared` are.

use std::path::{Path, PathBuf};

pub mod database;
pub mod netns;
pub mod servers;
pub mod stage;

pub use database::*;
pub use netns::{Host, Network};
pub use servers::*;
pub use stage::{Published, StageHarness};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository")
}

/// The shared folder with labelled photos and model files: `$PIPELINE_SHARED_DIR`,
/// else `../shared` beside the repository.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("PIPELINE_SHARED_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared"))
}

/// ONNX Runtime's library: `$PIPELINE_ONNXRUNTIME`, else where `scripts/setup` links it.
pub fn onnxruntime_library() -> PathBuf {
    std::env::var_os("PIPELINE_ONNXRUNTIME").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/tools/lib/libonnxruntime.so"))
}

/// Points `params` at the YuNet files in ../shared (2023mar for ONNX Runtime, 2022mar for
/// OpenCV), at RetinaFace (the second pass, on as in the repository's topology), and at
/// ONNX Runtime's library.
pub fn use_shared_models(params: &mut facepipe_core::topology::DetectParams) {
    params.model = Some(shared_dir().join("models/face_detection_yunet_2023mar.onnx"));
    params.opencv_model = Some(shared_dir().join("models/face_detection_yunet_2022mar.onnx"));
    params.onnxruntime = Some(onnxruntime_library());
    params.second_pass.model = shared_dir().join("models/retinaface_mnv2.onnx");
}

/// The repository's `topology.toml`, parsed.
pub fn repo_topology() -> facepipe_core::topology::Topology {
    facepipe_core::topology::Topology::parse(&std::fs::read_to_string(repo_root().join("topology.toml")).unwrap()).unwrap()
}
