//! `pipeline eval` on the labelled photos: the detect stage's settings from the
//! repository's topology must stay above the quality floor measured for them.

mod support;

use std::ffi::OsStr;
use std::process::Output;

use support::{bin, onnxruntime_library, repo_root, shared_dir};

/// Floors set from the measurements of the repository's settings (longer side 640 with
/// upscaling) on these photos: YuNet 2023mar on ONNX Runtime at score 0.7, P 0.953 / R 0.867;
/// its fallback, YuNet 2022mar on OpenCV at score 0.8, P 0.953 / R 0.863.
const MIN_PRECISION: &str = "0.93";
const MIN_RECALL: &str = "0.84";

/// `pipeline eval <args> --manifest <labelled photos>` with the repository's topology,
/// the YuNet files from ../shared, and ONNX Runtime's library at `onnxruntime`.
fn eval(args: &[&str], onnxruntime: impl AsRef<OsStr>) -> Output {
    std::process::Command::new(bin("pipeline"))
        .arg("--topology")
        .arg(repo_root().join("topology.toml"))
        .arg("eval")
        .args(args)
        .arg("--manifest")
        .arg(shared_dir().join("data/faces/manifest.json"))
        .env("PIPELINE_DETECT_MODEL", shared_dir().join("models/face_detection_yunet_2023mar.onnx"))
        .env("PIPELINE_DETECT_OPENCV_MODEL", shared_dir().join("models/face_detection_yunet_2022mar.onnx"))
        .env("PIPELINE_ONNXRUNTIME", onnxruntime)
        .output()
        .unwrap()
}

#[test]
fn detection_quality_stays_above_the_floor() {
    let out = eval(&["--json", "--min-precision", MIN_PRECISION, "--min-recall", MIN_RECALL], onnxruntime_library());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["detector"], "yunet", "the YuNet model must load, not the Haar fallback");
    assert_eq!(report["engine"], "onnxruntime", "ONNX Runtime must load, not the OpenCV fallback");
    assert_eq!(report["model"], "face_detection_yunet_2023mar.onnx");
    assert_eq!(report["score_threshold"], 0.7);
    let total = &report["total"];
    assert_eq!(total["images"], 127, "every photo with boxes is scored");
    assert_eq!(total["faces"], 211, "countable faces per the protocol");
    assert_eq!(total["count_images"], 27);
    assert!(report["by_source"]["wider_val_subset"]["faces"].as_u64().unwrap() > 150);
}

#[test]
fn eval_fails_below_a_floor() {
    let out = eval(&["--min-recall", "0.999"], onnxruntime_library());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("below the floor: recall"));
}

#[test]
fn without_onnxruntime_detect_warns_and_runs_yunet_on_opencv() {
    let out = eval(&["--json", "--min-precision", MIN_PRECISION, "--min-recall", MIN_RECALL], "/nonexistent/libonnxruntime.so");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("ONNX Runtime unavailable"), "the fallback is announced: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["detector"], "yunet");
    assert_eq!(report["engine"], "opencv");
    assert_eq!(report["model"], "face_detection_yunet_2022mar.onnx", "OpenCV 4.6 runs the 2022mar file");
    assert_eq!(report["score_threshold"], 0.8);
}
