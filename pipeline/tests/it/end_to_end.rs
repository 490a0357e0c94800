//! The whole flow through the real binaries, a real nats-server and a real PostgreSQL.

use std::collections::BTreeMap;

use futures::StreamExt;
use std::time::Duration;

use facepipe_core::messages::{DeadLetter, ExtractJob};
use facepipe_runtime::store::Store;
use crate::support::{iou, labelled_photos, shared_dir, write_zip, Deployment, PhotoZip};
use facepipe_core::domain::{BatchStatus, ImageStatus};

const BATCH_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn zip_batch_flows_through_all_four_stages() {
    let mut d = Deployment::start(|_| {}).await;
    let (zip, image_count) = faces_zip(d.dir.path());
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "e2e"]).trim().to_string();

    let status = d.wait_for_batch(&batch, BATCH_TIMEOUT).await;
    assert_eq!(status.status, BatchStatus::Completed, "{status:?}");
    assert_eq!(status.image_count, Some(image_count as i32));
    assert_eq!(status.processed, image_count as i32);
    assert_eq!(status.skipped, 1, "the README entry is skipped and counted");
    assert_eq!(status.failed, 1, "only the planted broken image fails");
    assert_eq!(status.progress_percent, 100.0);

    // Every entry has exactly one terminal outcome.
    let results = d.db().await.results(&batch).await.unwrap();
    assert_eq!(results.len(), image_count);
    let by_entry: BTreeMap<&str, &facepipe_ledger::ImageResult> =
        results.iter().map(|r| (r.entry.as_str(), r)).collect();
    assert_eq!(by_entry.len(), image_count, "entry names are unique");
    assert!(results.iter().all(|r| ["cropped", "no_face", "failed"].contains(&r.status.as_str())));

    let broken = by_entry["broken/truncated.jpg"];
    assert_eq!(broken.status, ImageStatus::Failed);
    assert_eq!(broken.failed_stage.map(|s| s.as_str()), Some("detect"));
    assert!(broken.error.as_deref().unwrap().contains("image"), "{broken:?}");

    // Crops exist, one per cropped image (policy `largest`), and are 300x300 JPEGs.
    let store = Store::open(&d.topology.object_store).unwrap();
    let crop_objects = store.list(&format!("batches/{batch}/crops")).await.unwrap();
    let cropped: Vec<_> = results.iter().filter(|r| r.status == ImageStatus::Cropped).collect();
    assert!(cropped.len() > 100, "most photos hold a face: {}", cropped.len());
    assert_eq!(crop_objects.len(), cropped.len());
    for r in &cropped {
        assert_eq!(r.crop_keys.len(), 1);
        let jpeg = store.get(&r.crop_keys[0]).await.unwrap();
        let size = imagesize::blob_size(&jpeg).unwrap();
        assert_eq!((size.width, size.height), (300, 300), "{}", r.crop_keys[0]);
        assert_eq!(imagesize::image_type(&jpeg).unwrap(), imagesize::ImageType::Jpeg);
        assert!(!r.faces.is_empty());
    }

    // Boxes are in original pixels: they overlap the labelled faces.
    let (mut labelled, mut matched) = (0, 0);
    for photo in labelled_photos() {
        let Some(faces) = &photo.faces else { continue };
        let detected: Vec<[f32; 4]> =
            by_entry[photo.file.as_str()].faces.iter().map(|f| [f.x, f.y, f.w, f.h]).collect();
        for (i, face) in faces.iter().enumerate() {
            let invalid = photo.wider_attrs.as_ref().is_some_and(|a| a[i].get(3) == Some(&1));
            if invalid || face[2].min(face[3]) < 40.0 {
                continue; // small and invalid faces are scored by `pipeline eval`, not here
            }
            labelled += 1;
            if detected.iter().any(|d| iou(*d, *face) >= 0.5) {
                matched += 1;
            }
        }
    }
    eprintln!("labelled faces >= 40 px matched at IoU 0.5: {matched}/{labelled}");
    assert!(labelled >= 50 && matched as f64 >= 0.8 * labelled as f64, "{matched}/{labelled}");

    // Photos without faces end as `no_face` whenever the detector agrees there is none.
    let no_face_photos: Vec<_> = labelled_photos().into_iter().filter(|p| p.faces.as_deref() == Some(&[])).collect();
    let mut clean = 0;
    for photo in &no_face_photos {
        let r = by_entry[photo.file.as_str()];
        if r.faces.is_empty() {
            assert_eq!(r.status, ImageStatus::NoFace, "{}", photo.file);
            assert!(r.crop_keys.is_empty());
            clean += 1;
        }
    }
    assert!(clean * 4 >= no_face_photos.len() * 3, "{clean}/{} no-face photos without detections", no_face_photos.len());

    // `pipeline results` prints the same records as JSON lines; `status --json` the progress.
    let lines = d.cli_ok(&["results", &batch]);
    assert_eq!(lines.lines().count(), image_count);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for field in ["entry", "status", "faces", "crop_keys", "error"] {
        assert!(first.get(field).is_some(), "results line lacks {field}: {first}");
    }
    let json: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status", &batch, "--json"])).unwrap();
    assert_eq!(json["status"], "completed");
    assert_eq!(json["progress_percent"], 100.0);

    // Queue statistics: every stage's queue drained, detect took every image.
    let stats: Vec<serde_json::Value> = serde_json::from_str(&d.cli_ok(&["stats", "--json"])).unwrap();
    let stage = |name: &str| stats.iter().find(|s| s["stage"] == name).unwrap().clone();
    for s in &stats {
        assert_eq!((s["waiting"].as_u64(), s["active"].as_u64()), (Some(0), Some(0)), "{s}");
    }
    assert_eq!(stage("detect")["completed"], image_count as u64, "one detect job per image");
    assert_eq!(stage("detect")["failed"], 1, "the broken image");
    assert_eq!(stage("persist")["completed"], image_count as u64, "one outcome per image");

    // Graceful shutdown: every stage exits 0 on SIGTERM.
    for (stage, code) in d.stop_stages() {
        assert_eq!(code, Some(0), "{stage} did not exit cleanly\n{}", d.logs());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn job_published_by_hand_without_batch_id_makes_exactly_one_batch() {
    let d = Deployment::start(|_| {}).await;
    let faces_dir = shared_dir().join("data/faces");
    let zip = d.dir.path().join("two.zip");
    let entries: Vec<(String, Vec<u8>)> = ["skimage/astronaut.png", "opencv_doc/fruits.jpg"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(faces_dir.join(f)).unwrap()))
        .collect();
    write_zip(&zip, &entries);

    // What `nats pub faces.extract '{...}'` does: a plain publish, no message id, local path.
    let client = async_nats::connect(&d.nats.url).await.unwrap();
    // What `nats sub 'faces.progress.>'` sees.
    let mut progress = client.subscribe("faces.progress.>").await.unwrap();
    let job = format!(r#"{{"project_id": "proj-123", "priority": 5, "zip": "{}"}}"#, zip.display());
    client.publish("faces.extract", job.into()).await.unwrap();
    client.flush().await.unwrap();

    let db = d.db().await;
    let batch = loop {
        let out = d.cli(&["status", "nonexistent"]);
        assert!(!out.status.success(), "unknown batches are an error");
        let c = d.db.client().await;
        let rows = c.query("SELECT batch_id FROM batches WHERE project_id = 'proj-123'", &[]).await.unwrap();
        if let Some(row) = rows.first() {
            assert_eq!(rows.len(), 1);
            break row.get::<_, String>(0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = d.wait_for_batch(&batch, BATCH_TIMEOUT).await;
    assert_eq!(status.status, BatchStatus::Completed);
    assert_eq!(status.image_count, Some(2));
    let results = db.results(&batch).await.unwrap();
    let statuses: Vec<&str> = results.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(statuses, vec!["cropped", "no_face"]);

    // One progress event per recorded outcome, the last one completing the batch.
    let mut events = Vec::new();
    while events.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), progress.next()).await.unwrap().unwrap();
        assert_eq!(msg.subject.as_str(), format!("faces.progress.{batch}"));
        events.push(serde_json::from_slice::<facepipe_ledger::Progress>(&msg.payload).unwrap());
    }
    // Persist records outcomes concurrently, so events may arrive in either order.
    events.sort_by_key(|e| e.processed);
    let processed: Vec<i32> = events.iter().map(|e| e.processed).collect();
    assert_eq!(processed, vec![1, 2]);
    assert!(events[1].completed && !events[0].completed);
    assert_eq!(events[1].image_count, Some(2));

    // `pipeline watch` on a finished batch ends at once with its summary.
    let out = d.cli_ok(&["watch", &batch]);
    assert!(out.contains("completed: 2/2 images, 0 failed"), "{out}");
    assert!(!d.cli(&["watch", "no-such-batch"]).status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_dead_lettered_and_workers_keep_serving() {
    let d = Deployment::start(|t| t.stages.persist.max_message_bytes = 4096).await;
    let client = async_nats::connect(&d.nats.url).await.unwrap();
    client.publish("faces.detect", "this is not json".into()).await.unwrap();
    let oversized = format!(r#"{{"batch_id": "b-big", "image_id": "0000001", "pad": "{}"}}"#, "x".repeat(10_000));
    client.publish("faces.persist", oversized.into()).await.unwrap();
    client.publish("faces.crop", r#"{"batch_id": 5, "image_id": [], "key": 3, "width": "wide"}"#.into()).await.unwrap();
    let unknown = r#"{"batch_id": "no-such-batch", "image_id": "0000001", "status": "no_face", "faces": [], "crop_keys": [], "attempts": 1}"#;
    client.publish("faces.persist", unknown.into()).await.unwrap();
    let gone = r#"{"batch_id": "ghost", "image_id": "0000001", "key": "batches/ghost/originals/0000001.jpg"}"#;
    client.publish("faces.detect", gone.into()).await.unwrap();
    client.publish("faces.crop", r#"{"batch_id": "b-x"}"#.into()).await.unwrap();
    client.publish("faces.extract", r#"{"project_id": "p", "zip": "/nonexistent/x.zip"}"#.into()).await.unwrap();
    client.flush().await.unwrap();

    // The dead-letter stream receives one letter per bad message, with stage and reason.
    let js = async_nats::jetstream::new(client.clone());
    let stream = d.topology.dead_letter_stream();
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while letters.len() < 8 {
        assert!(std::time::Instant::now() < deadline, "dead letters: {letters:?}\n{}", d.logs());
        letters.clear();
        let mut s = js.get_stream(&stream).await.unwrap();
        let last = s.info().await.unwrap().state.last_sequence;
        for seq in 1..=last {
            if let Ok(raw) = s.get_raw_message(seq).await {
                letters.push(serde_json::from_slice::<DeadLetter>(&raw.payload).unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut stages: Vec<&str> = letters.iter().map(|l| l.stage.as_str()).collect();
    stages.sort();
    // The missing object's failure, recorded for a batch nobody made, is refused by persist too.
    assert_eq!(stages, vec!["crop", "crop", "detect", "detect", "extract", "persist", "persist", "persist"]);
    let reason = |stage: &str, needle: &str| {
        letters.iter().find(|l| l.stage == stage && l.payload.contains(needle)).unwrap().error.clone()
    };
    assert!(reason("crop", r#""width": "wide""#).contains("invalid type"), "wrong types are named");
    let unknown = reason("persist", "no-such-batch");
    assert!(unknown.contains("no-such-batch"), "an unknown batch is named: {unknown}");
    let gone = reason("detect", "ghost");
    assert!(gone.contains("not found"), "a missing object is named: {gone}");
    assert!(letters.iter().all(|l| l.permanent && l.attempts == 1), "no retries for bad input: {letters:?}");
    let detect = letters.iter().find(|l| l.stage == "detect" && !l.payload.contains("ghost")).unwrap();
    assert_eq!(detect.payload, "this is not json");
    assert!(detect.error.contains("malformed"), "{detect:?}");
    let crop = letters.iter().find(|l| l.stage == "crop" && !l.payload.contains("wide")).unwrap();
    assert!(crop.error.contains("key"), "names the missing field: {crop:?}");
    let persist = letters.iter().find(|l| l.stage == "persist" && l.payload.contains("b-big")).unwrap();
    assert!(persist.error.contains("exceeds max_message_bytes (4096)"), "{persist:?}");
    assert_eq!((persist.batch_id.as_deref(), persist.image_id.as_deref()), (Some("b-big"), Some("0000001")));
    let extract = letters.iter().find(|l| l.stage == "extract").unwrap();
    assert!(extract.error.contains("not found"), "{extract:?}");

    // The failed extract job is a failed batch with its reason.
    let c = d.db.client().await;
    let row = c.query_one("SELECT status, error FROM batches WHERE project_id = 'p'", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert!(row.get::<_, String>(1).contains("not found"));

    // The workers still serve: a good batch goes through.
    let zip = d.dir.path().join("one.zip");
    let astronaut = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    write_zip(&zip, &[("astronaut.png".into(), astronaut)]);
    let job = ExtractJob::for_zip(Some("after-bad".into()), "p".into(), facepipe_core::domain::Priority::DEFAULT, zip.display().to_string());
    client.publish("faces.extract", serde_json::to_vec(&job).unwrap().into()).await.unwrap();
    let status = d.wait_for_batch("after-bad", BATCH_TIMEOUT).await;
    assert_eq!((status.status, status.processed, status.failed), (BatchStatus::Completed, 1, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_is_idempotent_and_dry_run_changes_nothing() {
    let d = Deployment::start(|_| {}).await;
    let again = d.cli_ok(&["apply"]);
    assert!(!again.contains("create") && !again.contains("update"), "{again}");
    // Five streams; a consumer per stage and priority band (three bands by default).
    assert_eq!(again.matches("unchanged").count(), 5 + 4 * 3, "{again}");
    assert!(again.contains("Running stages: no setting changes"), "{again}");

    // A changed consumer setting is planned as an in-place update; --dry-run leaves it alone.
    let mut changed = d.topology.clone();
    changed.stages.detect.max_deliver = 7;
    let path = d.dir.path().join("changed.toml");
    std::fs::write(&path, toml::to_string(&changed).unwrap()).unwrap();
    let plan = d.cli_ok_with(&path, &["apply", "--dry-run"]);
    for durable in ["detect", "detect-high", "detect-low"] {
        assert!(plan.contains(&format!("update    consumer FACES_DETECT/{durable} (max_deliver 3 -> 7)")), "{plan}");
    }
    assert!(plan.contains("~ live      stages.detect.max_deliver: 3 -> 7"), "{plan}");
    let still = d.cli_ok_with(&path, &["apply", "--dry-run"]);
    assert!(still.contains("update"), "dry run applied nothing: {still}");
    d.cli_ok_with(&path, &["apply"]);
    let done = d.cli_ok_with(&path, &["apply", "--dry-run"]);
    assert!(!done.contains("update"), "{done}");

    // A stream limit is an in-place update of every stage's stream.
    changed.nats.stream_max_bytes = Some(bytesize::ByteSize::mib(64));
    std::fs::write(&path, toml::to_string(&changed).unwrap()).unwrap();
    let plan = d.cli_ok_with(&path, &["apply"]);
    for stage in ["EXTRACT", "DETECT", "CROP", "PERSIST"] {
        assert!(plan.contains(&format!("update    stream FACES_{stage} (replicas 1) (max_bytes -1 -> 67108864)")), "{plan}");
    }
    let js = async_nats::jetstream::new(async_nats::connect(&d.nats.url).await.unwrap());
    let info = js.get_stream("FACES_DETECT").await.unwrap().info().await.unwrap().config.clone();
    assert_eq!((info.max_bytes, info.discard), (67108864, async_nats::jetstream::stream::DiscardPolicy::New));
}

/// nats-server before 2.10 (Debian bookworm's 2.9) cannot give a consumer both a band's
/// plain subject and its batch subjects: `apply` refuses it with what to do, before
/// creating anything. A distribution's newer server is applied to.
#[tokio::test(flavor = "multi_thread")]
async fn apply_on_the_distributions_nats_server_says_what_is_needed_when_it_is_too_old() {
    let old = std::path::Path::new("/usr/sbin/nats-server");
    assert!(old.is_file(), "the distribution's nats-server (package nats-server; `scripts/setup --test` installs it)");
    let version = std::process::Command::new(old).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let numbers: Vec<u64> = version.trim().trim_start_matches("nats-server: v").split('.').filter_map(|p| p.parse().ok()).collect();
    let too_old = numbers.len() >= 2 && (numbers[0], numbers[1]) < (2, 10);
    let port = crate::support::free_port();
    let store = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new(old)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::support::wait_for_port(port, Duration::from_secs(10));
    let d = Deployment::start_stages(|_| {}, Vec::new(), Vec::new(), false, &[]).await;
    let out = d.command("pipeline").args(["apply"]).env("PIPELINE_NATS_URL", format!("nats://127.0.0.1:{port}")).output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    if too_old {
        assert!(!out.status.success(), "{version}: {err}");
        assert!(err.contains("cannot give a consumer two filter subjects") && err.contains("2.10 or newer"), "{err}");
    } else {
        assert!(out.status.success(), "{version}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_delivered_again_is_counted_as_skipped_and_changes_nothing() {
    let mut d = Deployment::start(|_| {}).await;
    let zip = d.dir.path().join("one.zip");
    let astronaut = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    write_zip(&zip, &[("astronaut.png".into(), astronaut)]);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "once"]);
    let before = d.wait_for_batch("once", BATCH_TIMEOUT).await;

    // A persist process with metrics takes over; the outcome arrives once more.
    d.signal(3, libc::SIGTERM);
    assert_eq!(crate::support::wait_exit(&mut d.stages[3].1, Duration::from_secs(30)), Ok(Some(0)));
    let port = d.start_stage_with_metrics(facepipe_core::topology::StageName::Persist);
    crate::support::wait_for_port(port, Duration::from_secs(30));
    let row = d.db().await.results("once").await.unwrap().remove(0);
    let outcome = serde_json::json!({
        "batch_id": "once", "image_id": row.image_id, "status": row.status, "faces": row.faces,
        "crop_keys": row.crop_keys, "attempts": 1,
    });
    let client = async_nats::connect(&d.nats.url).await.unwrap();
    client.publish("faces.persist", outcome.to_string().into()).await.unwrap();
    client.flush().await.unwrap();
    let skipped = || crate::support::prometheus_counter(port, "facepipe_messages_total", &[r#"stage="persist""#, r#"outcome="skipped""#]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while skipped() < 1.0 {
        assert!(std::time::Instant::now() < deadline, "not counted as skipped\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = d.db().await.batch_status("once").await.unwrap().unwrap();
    assert_eq!((after.processed, after.failed, after.faces), (before.processed, before.failed, before.faces));
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_uncertain_photos_are_decided_by_the_second_pass_and_recorded_so() {
    let retinaface = crate::support::shared_dir().join("models/retinaface_mnv2.onnx");
    assert!(retinaface.is_file(), "{} is missing (../shared/models)", retinaface.display());
    // The repository's topology as it is: the second pass is on.
    let mut d = Deployment::start(|t| assert!(t.stages.detect.params.second_pass.active().is_some())).await;
    // A detect process that serves metrics, in place of the harness's.
    while d.count_in_logs("stage started stage=detect") == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let detect = d.stages.iter().position(|(s, _)| *s == facepipe_core::topology::StageName::Detect).unwrap();
    d.signal(detect, libc::SIGTERM);
    assert_eq!(d.stages.remove(detect).1.wait().unwrap().code(), Some(0));
    let metrics = d.start_stage_with_metrics(facepipe_core::topology::StageName::Detect);
    // Crowded WIDER photos (YuNet is unsure of some faces) and single portraits (it is not).
    let photos = labelled_photos();
    let chosen = photos.iter().filter(|p| p.file.starts_with("wider_val_subset/") || p.file.starts_with("face_recognition/")).step_by(6);
    let (zip, image_count) = PhotoZip::of(chosen).write(&d.dir.path().join("second-pass.zip"));
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "second-pass"]).trim().to_string();
    let status = d.wait_for_batch(&batch, BATCH_TIMEOUT).await;
    assert_eq!((status.status, status.failed), (BatchStatus::Completed, 0), "{status:?}");

    let results = d.db().await.results(&batch).await.unwrap();
    let decided_by = |name: &str| results.iter().filter(|r| r.detector.map(|d| d.as_str()) == Some(name)).count();
    let (second, first) = (decided_by("retinaface"), decided_by("yunet"));
    assert_eq!(second + first, image_count, "every photo names the detector that decided it");
    assert!(second > 0 && first > 0, "RetinaFace decided {second} photos, YuNet {first}");
    assert!(results.iter().filter(|r| r.detector.map(|d| d.as_str()) == Some("retinaface")).any(|r| !r.faces.is_empty()));
    assert!(d.logs().contains("retinaface_mnv2.onnx"), "detect announces its second pass");
    let counted = crate::support::prometheus_counter(metrics, "facepipe_second_pass_images_total", &[r#"stage="detect""#]);
    assert_eq!(counted, second as f64, "the metric counts the photos RetinaFace decided");
}

/// Every labelled photo, a truncated JPEG and a text file; its image count.
fn faces_zip(dir: &std::path::Path) -> (std::path::PathBuf, usize) {
    PhotoZip::of(&labelled_photos())
        .with("broken/truncated.jpg", *b"\xff\xd8\xff\xe0 not really a jpeg")
        .with("notes/README.txt", *b"not an image")
        .write(&dir.join("faces.zip"))
}
