//! Retention against the real stages, object store, database and `pipeline
//! serve`'s sweeper: while a batch is in flight nothing of it is deleted, so a
//! redelivery finds its original; once it completes (and the readers' retry
//! horizon has passed) the expired objects go, and what a replay needs stays.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use facepipe_core::topology::StageName;
use facepipe_runtime::faults::FAULT_CRASH_ON_ENV;
use crate::support::{free_port, shared_dir, wait_for_port, write_zip, Deployment};
use facepipe_core::domain::{BatchStatus, ImageStatus};

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sweeps_keep_what_redeliveries_and_replays_need_and_delete_the_rest() {
    let mut d = Deployment::start_stages(
        |t| {
            t.retention.uploads = Some(Duration::ZERO);
            t.retention.originals = Some(Duration::ZERO);
            t.retention.crops = None;
            t.retention.sweep_every = Duration::from_secs(1);
            t.retention.staging_age = Duration::from_secs(600);
            // Short retry horizons, so the test waits seconds, not minutes, after completion.
            t.stages.extract.ack_wait = Duration::from_secs(2);
            t.stages.extract.max_deliver = 3;
            t.stages.detect.ack_wait = Duration::from_secs(2);
            t.stages.detect.max_deliver = 3;
            t.stages.crop.ack_wait = Duration::from_secs(2);
            t.stages.crop.max_deliver = 3;
        },
        Vec::new(),
        Vec::new(),
        false,
        &[StageName::Extract, StageName::Detect, StageName::Persist],
    )
    .await;
    // This crop process dies on the first image's message; the one started after it has no such hook.
    d.stage_env = vec![(FAULT_CRASH_ON_ENV.into(), "kept/originals/0000000".into())];
    d.start_stage(StageName::Crop);
    d.stage_env.clear();

    // `pipeline serve` sweeps every second for the whole test, batch in flight or not.
    let port = free_port();
    let log = std::fs::File::create(d.dir.path().join("serve.log")).unwrap();
    let mut serve = d
        .command("pipeline")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("PIPELINE_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(30));

    let objects = d.dir.path().join("objects");
    // Staging files a crash left: an old one goes, a fresh one (a write in progress) stays.
    let staging = objects.join("batches/elsewhere/originals");
    std::fs::create_dir_all(&staging).unwrap();
    let old = staging.join("0000003.jpg#1");
    std::fs::write(&old, b"half a write").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let fresh = staging.join("0000004.jpg#2");
    std::fs::write(&fresh, b"being written").unwrap();

    let faces = shared_dir().join("data/faces");
    let photo = |p: &str| std::fs::read(faces.join(p)).unwrap();
    let entries = vec![
        ("astronaut.png".to_string(), photo("skimage/astronaut.png")),
        ("messi.jpg".to_string(), photo("opencv_doc/messi5.jpg")),
        ("apple.jpg".to_string(), photo("opencv_doc/apple.jpg")),
        ("broken.jpg".to_string(), b"\xff\xd8\xff\xe0 not really a jpeg".to_vec()),
    ];
    let zip = d.dir.path().join("kept.zip");
    write_zip(&zip, &entries);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "kept"]);

    // crop dies on image 0: the batch is in flight, and the sweeper has run meanwhile.
    let crop = d.stages.iter().position(|(s, _)| *s == StageName::Crop).unwrap();
    let started = Instant::now();
    while d.stages[crop].1.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(120), "crop never reached the marked image: {}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // two more sweeps
    let originals = objects.join("batches/kept/originals");
    assert_eq!(files_under(&originals), ["0000000.png", "0000001.jpg", "0000002.jpg", "0000003.jpg"], "nothing of a batch in flight");
    assert!(objects.join("uploads/kept.zip").exists());

    // The redelivery after those sweeps finds its original.
    assert_eq!(d.restart_exited(), 1);
    let status = d.wait_for_batch("kept", Duration::from_secs(120)).await;
    assert_eq!((status.status, status.processed, status.failed), (BatchStatus::Completed, 4, 1));
    let results = d.db().await.results("kept").await.unwrap();
    assert_eq!((results[0].status.as_str(), results[0].attempts), ("cropped", 2), "{results:?}");
    let crops = files_under(&objects.join("batches/kept/crops"));
    assert!(!crops.is_empty());

    // Past the horizon, the sweeper deletes the final images' originals and the upload;
    // the failed image's original stays for a replay, the crops stay (no period set).
    eventually("the originals swept", Duration::from_secs(60), || files_under(&originals) == ["0000003.jpg"]).await;
    eventually("the upload swept", Duration::from_secs(60), || !objects.join("uploads/kept.zip").exists()).await;
    assert_eq!(files_under(&objects.join("batches/kept/crops")), crops);
    eventually("the old staging file swept", Duration::from_secs(30), || !old.exists()).await;
    assert!(fresh.exists(), "a write in progress is left alone");
    let serve_log = std::fs::read_to_string(d.dir.path().join("serve.log")).unwrap();
    assert!(serve_log.contains("retention sweep done") && !serve_log.contains("retention sweep failed"), "{serve_log}");

    // A replay of the failed image after the sweep finds its input: it fails the same way again.
    let before = results[3].error.clone().unwrap();
    assert!(d.cli_ok(&["dead-letters", "replay", "--batch", "kept"]).contains("replayed 1"));
    let db = d.db().await;
    let start = Instant::now();
    loop {
        let r = db.results("kept").await.unwrap().remove(3);
        if r.status == ImageStatus::Failed && db.batch_status("kept").await.unwrap().unwrap().status == BatchStatus::Completed {
            assert_eq!(r.error.as_deref(), Some(before.as_str()), "the same failure, not a missing original");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "replay never finished: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    assert_eq!(crate::support::wait_exit(&mut serve, Duration::from_secs(20)).unwrap(), Some(0));

    // `pipeline sweep` once by hand: the batch completed again, so it is swept again, and
    // the failed image's original still stays.
    tokio::time::sleep(Duration::from_secs(8)).await; // the horizon since the new completion
    let report: serde_json::Value = serde_json::from_str(&d.cli_ok(&["sweep", "--json"])).unwrap();
    assert_eq!(report["ran"], true, "{report}");
    assert_eq!(files_under(&originals), ["0000003.jpg"]);
    assert_eq!(files_under(&objects.join("batches/kept/crops")), crops);
    let lines = d.cli_ok(&["results", "kept"]).lines().count();
    assert_eq!(lines, 4, "results still list every image");
}
