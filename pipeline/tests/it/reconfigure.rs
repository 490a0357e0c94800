//! Live reconfiguration: `pipeline apply` of a changed topology reaches the
//! running stages through the key-value bucket, without a restart.

use std::time::{Duration, Instant};

use facepipe_runtime::store::Store;
use crate::support::{labelled_photos, shared_dir, write_zip, Deployment};
use facepipe_core::domain::BatchStatus;

#[tokio::test(flavor = "multi_thread")]
async fn crop_size_changed_mid_batch_applies_to_later_crops_without_restarts() {
    // Every crop slowed to 100 ms, so the batch is still running when the change lands.
    let env = vec![("PIPELINE_FAULT_SLOW_ON".to_string(), "originals=100".to_string())];
    let mut d = Deployment::start_with_env(|_| {}, env).await;
    let faces_dir = shared_dir().join("data/faces");
    let photos = labelled_photos();
    let entries: Vec<(String, Vec<u8>)> = photos
        .iter()
        .filter(|p| p.faces.as_ref().is_some_and(|f| !f.is_empty()))
        .cycle()
        .take(60)
        .enumerate()
        .map(|(i, p)| (format!("{i:03}.jpg"), std::fs::read(faces_dir.join(&p.file)).unwrap()))
        .collect();
    let zip = d.dir.path().join("batch.zip");
    write_zip(&zip, &entries);
    let pids: Vec<u32> = d.stages.iter().map(|(_, c)| c.id()).collect();

    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "live"]).trim().to_string();
    let db = d.db().await;
    let start = Instant::now();
    while db.batch_status(&batch).await.unwrap().map(|s| s.processed).unwrap_or(0) < 10 {
        assert!(start.elapsed() < Duration::from_secs(120), "batch does not start:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The operator edits the file and applies it: a live change and a restart-only one.
    let mut changed = d.topology.clone();
    changed.stages.crop.params.output_size = 200;
    changed.stages.detect.concurrency = 3;
    changed.stages.crop.metrics_addr = Some("127.0.0.1:0".into());
    let path = d.dir.path().join("changed.toml");
    std::fs::write(&path, toml::to_string(&changed).unwrap()).unwrap();
    let plan = d.cli_ok_with(&path, &["apply", "--dry-run"]);
    assert!(plan.contains("~ live      stages.crop.params.output_size: 300 -> 200"), "{plan}");
    assert!(plan.contains("! restart   stages.crop.metrics_addr"), "{plan}");
    let applied = d.cli_ok_with(&path, &["apply"]);
    assert!(applied.contains("topology stored for running stages"), "{applied}");
    let processed_at_change = db.batch_status(&batch).await.unwrap().unwrap().processed;

    let status = d.wait_for_batch(&batch, Duration::from_secs(300)).await;
    assert_eq!(status.status, BatchStatus::Completed, "{status:?}");
    assert_eq!(status.processed, 60, "no message lost");

    // Crops made before the change are 300 px, those after 200 px; both exist.
    let store = Store::open(&d.topology.object_store).unwrap();
    let (mut before, mut after) = (0, 0);
    for key in store.list(&format!("batches/{batch}/crops")).await.unwrap() {
        let bytes = store.get(&key).await.unwrap();
        let size = imagesize::blob_size(&bytes).unwrap();
        assert_eq!(size.width, size.height, "{key}");
        match size.width {
            300 => before += 1,
            200 => after += 1,
            other => panic!("{key}: unexpected crop size {other}"),
        }
    }
    println!("{processed_at_change} images processed at the change; crops: {before} at 300 px, {after} at 200 px");
    assert!(before > 0 && after > 0, "before {before}, after {after}");

    // The same processes did it all.
    let now: Vec<u32> = d.stages.iter().map(|(_, c)| c.id()).collect();
    assert_eq!(pids, now);
    assert_eq!(d.restart_exited(), 0, "no stage process exited");
    assert!(d.count_in_logs("configuration changed live") >= 4, "every stage saw it:\n{}", d.logs());
    assert_eq!(d.count_in_logs("concurrency changed live"), 1, "detect took a third slot:\n{}", d.logs());
    assert!(d.count_in_logs("need a restart") >= 1, "the restart-only change is reported:\n{}", d.logs());
}
