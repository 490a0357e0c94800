//! A detector that cannot load is never served around: detect refuses to serve
//! (its log and `/readyz` say why), a live change to a model that does not load
//! is refused while the old detector keeps running, and Haar runs only where
//! the topology names it. Real binaries, nats-server and PostgreSQL.

use std::process::Command;
use std::time::{Duration, Instant};

use facepipe_core::topology::{DetectFallback, StageName};
use facepipe_core::domain::BatchStatus;
use crate::support::{bin, http_get, labelled_photos, repo_root, wait_for_port, Deployment, PhotoZip};

const BATCH_TIMEOUT: Duration = Duration::from_secs(300);
const MISSING: &str = "/nonexistent/face_detection_yunet.onnx";

/// Polls `/readyz` until its status is `want` with a body containing `says`; returns the body.
fn wait_readyz(port: u16, want: u16, says: &str) -> String {
    wait_for_port(port, Duration::from_secs(60));
    let started = Instant::now();
    loop {
        let (code, body) = http_get(port, "/readyz");
        if code == want && body.contains(says) {
            return body;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "/readyz never answered {want}: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn detect_without_a_loadable_model_refuses_to_serve_and_says_why() {
    let mut d = Deployment::start(|t| {
        t.stages.detect.params.model = Some(MISSING.into());
        t.stages.detect.params.opencv_model = Some(MISSING.into());
    })
    .await;
    let port = d.start_stage_with_metrics(StageName::Detect);
    let body = wait_readyz(port, 503, "not ready: ");
    assert!(body.contains("YuNet does not load") && body.contains(MISSING), "/readyz names the reason: {body}");
    assert!(d.logs().contains("refusing to serve"), "the log says so: {}", d.logs());
    // It stays up, not pulling, rather than exiting into a restart loop or serving Haar.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.restart_exited(), 0, "detect keeps running while it refuses");
    assert!(!d.logs().contains("Haar"), "no silent Haar fallback: {}", d.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn haar_runs_only_where_the_topology_names_it_as_the_fallback() {
    let mut d = Deployment::start(|t| {
        t.stages.detect.params.model = Some(MISSING.into());
        t.stages.detect.params.opencv_model = Some(MISSING.into());
        t.stages.detect.params.fallback = DetectFallback::Haar;
        // Haar cannot run the second pass, which is required by default.
        t.stages.detect.params.second_pass.enabled = false;
    })
    .await;
    let port = d.start_stage_with_metrics(StageName::Detect);
    wait_readyz(port, 200, "ready");
    assert!(d.logs().contains("Haar fallback the topology names"), "the fallback is announced: {}", d.logs());
    let zip = faces_zip(d.dir.path());
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "haar"]).trim().to_string();
    d.wait_for_batch(&batch, BATCH_TIMEOUT).await;
    let results = d.db().await.results(&batch).await.unwrap();
    assert!(results.iter().all(|r| r.detector == Some(facepipe_core::domain::Detector::Haar)), "{results:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_change_to_a_model_that_does_not_load_is_refused_and_the_old_detector_keeps_running() {
    let d = Deployment::start(|_| {}).await;
    let mut broken = d.topology.clone();
    broken.stages.detect.params.model = Some(MISSING.into());
    broken.stages.detect.params.opencv_model = Some(MISSING.into());
    let path = d.dir.path().join("broken.toml");
    std::fs::write(&path, toml::to_string(&broken).unwrap()).unwrap();
    d.cli_ok_with(&path, &["apply"]);
    // Running stages watch the live configuration; give detect a moment to see the change.
    std::thread::sleep(Duration::from_secs(2));

    let zip = faces_zip(d.dir.path());
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "live"]).trim().to_string();
    let status = d.wait_for_batch(&batch, BATCH_TIMEOUT).await;
    assert_eq!((status.status, status.failed), (BatchStatus::Completed, 0), "{status:?}");
    let results = d.db().await.results(&batch).await.unwrap();
    assert!(results.iter().any(|r| !r.faces.is_empty()), "YuNet kept finding faces: {results:?}");
    assert!(results.iter().all(|r| r.detector != Some(facepipe_core::domain::Detector::Haar)), "{results:?}");
    assert!(d.logs().contains("live detector change refused"), "the refusal is logged: {}", d.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_pass_that_cannot_run_is_refused_unless_the_topology_allows_yunet_alone() {
    const NO_RETINAFACE: &str = "/nonexistent/retinaface_mnv2.onnx";
    // Required (the default): detect refuses to serve, and says why.
    let mut d = Deployment::start(|t| t.stages.detect.params.second_pass.model = NO_RETINAFACE.into()).await;
    let port = d.start_stage_with_metrics(StageName::Detect);
    let body = wait_readyz(port, 503, "not ready: ");
    assert!(body.contains("second pass") && body.contains(NO_RETINAFACE), "/readyz names the reason: {body}");
    assert_eq!(d.restart_exited(), 0, "detect keeps running while it refuses");
    drop(d);

    // Not required: YuNet alone, and /readyz says what is missing.
    let mut d = Deployment::start(|t| {
        t.stages.detect.params.second_pass.model = NO_RETINAFACE.into();
        t.stages.detect.params.second_pass.required = false;
    })
    .await;
    let port = d.start_stage_with_metrics(StageName::Detect);
    let body = wait_readyz(port, 200, "ready, without the second pass");
    assert!(body.contains(NO_RETINAFACE), "{body}");
    assert!(d.logs().contains("second pass unavailable"), "the log says so: {}", d.logs());
    let zip = faces_zip(d.dir.path());
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "alone"]).trim().to_string();
    let status = d.wait_for_batch(&batch, BATCH_TIMEOUT).await;
    assert_eq!((status.status, status.failed), (BatchStatus::Completed, 0), "{status:?}");
    let results = d.db().await.results(&batch).await.unwrap();
    assert!(results.iter().all(|r| r.detector == Some(facepipe_core::domain::Detector::Yunet)), "{results:?}");
}

#[test]
fn validate_takes_the_topology_as_a_positional_argument_too() {
    let topology = repo_root().join("topology.toml");
    let out = Command::new(bin("pipeline")).arg("validate").arg(&topology).env_remove("PIPELINE_TOPOLOGY").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("topology.toml: valid"));
    let missing = Command::new(bin("pipeline")).args(["validate", "/nonexistent/topology.toml"]).output().unwrap();
    assert!(!missing.status.success(), "a missing file is an error");
}

/// Four labelled photos that hold faces.
fn faces_zip(dir: &std::path::Path) -> std::path::PathBuf {
    let photos = labelled_photos();
    let with_faces = photos.iter().filter(|p| p.faces.as_ref().is_some_and(|f| !f.is_empty())).take(4);
    PhotoZip::of(with_faces).write(&dir.join("photos.zip")).0
}
