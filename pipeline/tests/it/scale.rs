//! Scaling a stage out is starting more processes: every replica binds the
//! stage's one durable consumer and takes a share of the work, and the batch
//! ends exactly as it does with one process.

use std::collections::BTreeMap;

use facepipe_core::topology::StageName;
use crate::support::{labelled_photos, prometheus_counter, shared_dir, write_zip, Deployment, PhotoZip};
use facepipe_core::domain::BatchStatus;

#[tokio::test(flavor = "multi_thread")]
async fn three_detect_processes_share_a_batch_and_match_a_one_process_run() {
    let mut d = Deployment::start(|t| t.stages.detect.concurrency = 1).await;
    // Replace the one detect process by three that serve metrics, so each one's share can be read.
    while d.count_in_logs("stage started stage=detect") == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let detect = d.stages.iter().position(|(s, _)| *s == StageName::Detect).unwrap();
    d.signal(detect, libc::SIGTERM);
    let mut original = d.stages.remove(detect).1;
    assert_eq!(original.wait().unwrap().code(), Some(0));
    let ports: Vec<u16> = (0..3).map(|_| d.start_stage_with_metrics(StageName::Detect)).collect();

    let (zip, image_count) = PhotoZip::of(&labelled_photos()).write(&d.dir.path().join("faces.zip"));
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "scaled"]);
    let status = d.wait_for_batch("scaled", std::time::Duration::from_secs(300)).await;
    assert_eq!((status.status, status.processed), (BatchStatus::Completed, image_count as i32));

    // Every replica did part of the work, and together exactly all of it.
    for port in &ports {
        assert_eq!(crate::support::http_get(*port, "/healthz").0, 200);
        assert_eq!(crate::support::http_get(*port, "/readyz"), (200, "ready\n".to_string()));
        assert_eq!(crate::support::http_get(*port, "/nothing").0, 404);
    }
    let shares: Vec<f64> = ports
        .iter()
        .map(|p| prometheus_counter(*p, "facepipe_messages_total", &[r#"stage="detect""#, r#"outcome="ok""#]))
        .collect();
    eprintln!("detect shares: {shares:?}");
    assert!(shares.iter().all(|s| *s >= 5.0), "each replica took a share: {shares:?}");
    assert_eq!(shares.iter().sum::<f64>(), image_count as f64);

    // `pipeline stats` counts the processes connected to each stage.
    let stats: serde_json::Value = serde_json::from_str(&d.cli_ok(&["stats", "--json"])).unwrap();
    let replicas = |stage: &str| stats.as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap()["replicas"].clone();
    assert_eq!((replicas("detect"), replicas("crop")), (3.into(), 1.into()), "{stats}");

    // The same archive through a single detect process gives the same outcomes.
    while d.count_in_logs("stage started stage=detect") < 4 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        let i = d.stages.iter().position(|(s, _)| *s == StageName::Detect).unwrap();
        d.signal(i, libc::SIGTERM);
        let mut child = d.stages.remove(i).1;
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "single"]);
    d.wait_for_batch("single", std::time::Duration::from_secs(300)).await;
    let db = d.db().await;
    let outcome = |rows: Vec<facepipe_ledger::ImageResult>| -> BTreeMap<String, (String, usize, Vec<String>)> {
        rows.into_iter()
            .map(|r| {
                let boxes = r.faces.iter().map(|f| format!("{:.1},{:.1},{:.1},{:.1}", f.x, f.y, f.w, f.h)).collect();
                (r.entry, (r.status.to_string(), r.crop_keys.len(), boxes))
            })
            .collect()
    };
    let scaled = outcome(db.results("scaled").await.unwrap());
    let single = outcome(db.results("single").await.unwrap());
    assert_eq!(scaled, single);
}

/// The stage processes `pid` has started, by binary name.
fn children_by_name(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in list.split_whitespace() {
        if let Ok(name) = std::fs::read_to_string(format!("/proc/{child}/comm")) {
            *names.entry(name.trim().to_string()).or_insert(0) += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_up_starts_the_topology_replicas_unless_a_flag_overrides_them() {
    let mut d = Deployment::start(|t| t.stages.detect.replicas = 2).await;
    d.stop_stages();
    d.stages.clear();
    let mut up = d.command("pipeline").args(["up", "--replicas", "crop=2"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let want: BTreeMap<String, usize> =
        [("crop", 2), ("detect", 2), ("extract", 1), ("persist", 1)].into_iter().map(|(n, c)| (n.to_string(), c)).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while children_by_name(up.id()) != want {
        assert!(std::time::Instant::now() < deadline, "children: {:?}", children_by_name(up.id()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let zip = d.dir.path().join("one.zip");
    let astronaut = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    write_zip(&zip, &[("astronaut.png".into(), astronaut)]);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "up"]);
    let status = d.wait_for_batch("up", std::time::Duration::from_secs(60)).await;
    assert_eq!(status.status, BatchStatus::Completed);
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert_eq!(crate::support::wait_exit(&mut up, std::time::Duration::from_secs(30)), Ok(Some(0)));
}

/// A tiny JPEG (48x36), one of 64 patterns: many entries, little detection work.
fn tiny_jpeg(pattern: usize) -> Vec<u8> {
    let (w, h) = (48u16, 36u16);
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h as usize {
        for x in 0..w as usize {
            let v = (x * (pattern % 8 + 1) + y * (pattern / 8 + 1)) as u8;
            rgb.extend_from_slice(&[v, v.wrapping_mul(3), 255 - v]);
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 80).encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// The CI-sized scale run: a batch of 20,000 entries completes with every outcome
/// recorded exactly once, its results stream, its dead letters page, and
/// retention sweeps its originals. Detection is kept cheap (48x36 photos, the
/// detector at width 64 without upscaling, no second pass): this asserts
/// behaviour at size, not speed (`scripts/bench --scale` measures that).
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_20000_entries_records_each_outcome_once_streams_pages_and_sweeps() {
    const N: usize = 20_000;
    const BROKEN: [usize; 5] = [0, 4_999, 9_999, 14_999, 19_999];
    let d = Deployment::start(|t| {
        let p = &mut t.stages.detect.params;
        (p.width, p.upscale, p.second_pass.enabled) = (64, false, false);
        t.stages.detect.concurrency = 4;
        t.retention.uploads = Some(std::time::Duration::ZERO);
        t.retention.originals = Some(std::time::Duration::ZERO);
        for s in [&mut t.stages.extract.ack_wait, &mut t.stages.detect.ack_wait, &mut t.stages.crop.ack_wait] {
            *s = std::time::Duration::from_secs(2);
        }
        (t.stages.extract.max_deliver, t.stages.detect.max_deliver, t.stages.crop.max_deliver) = (3, 3, 3);
    })
    .await;
    let patterns: Vec<Vec<u8>> = (0..64).map(tiny_jpeg).collect();
    let mut entries: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            if BROKEN.contains(&i) {
                (format!("broken-{i}.jpg"), b"\xff\xd8\xff\xe0 not a jpeg".to_vec())
            } else {
                (format!("p/{i:05}.jpg"), patterns[i % patterns.len()].clone())
            }
        })
        .collect();
    entries.push(("notes.txt".into(), b"not an image".to_vec()));
    let zip = d.dir.path().join("big.zip");
    write_zip(&zip, &entries);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "big"]);
    let status = d.wait_for_batch("big", std::time::Duration::from_secs(1500)).await;
    assert_eq!(
        (status.status.as_str(), status.image_count, status.processed, status.failed, status.skipped),
        ("completed", Some(N as i32), N as i32, BROKEN.len() as i32, 1)
    );

    // Every image has exactly one outcome, and the counters match the rows.
    let client = d.db.client().await;
    let rows = client
        .query("SELECT status, count(*) FROM images WHERE batch_id = 'big' GROUP BY status ORDER BY status", &[])
        .await
        .unwrap();
    let by_status: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(by_status.get("pending"), None, "{by_status:?}");
    assert_eq!(by_status.values().sum::<i64>(), N as i64, "{by_status:?}");
    assert_eq!(by_status["failed"], BROKEN.len() as i64);

    // `pipeline results` streams them all, once each, in order.
    let out = d.cli_ok(&["results", "big"]);
    let ids: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["image_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), N);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in image order, no repeats");

    // Dead letters in pages: a limit, a cursor, and a replay by id.
    let list = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["dead-letters", "list", "--batch", "big", "--json"];
        all.extend_from_slice(args);
        d.cli_ok(&all).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let letters = list(&[]);
    assert_eq!(letters.len(), BROKEN.len());
    let first_two = list(&["--limit", "2"]);
    assert_eq!(first_two, letters[..2]);
    let after = letters[1]["id"].to_string();
    assert_eq!(list(&["--after", &after, "--limit", "2"]), letters[2..4]);
    let last = letters[4]["id"].to_string();
    assert!(d.cli_ok(&["dead-letters", "replay", "--id", &last]).contains("replayed 1"));
    let status = d.wait_for_batch("big", std::time::Duration::from_secs(120)).await;
    assert_eq!((status.processed, status.failed), (N as i32, BROKEN.len() as i32), "the replay failed again, counted once");

    // Retention: once past the readers' retry horizon, a sweep deletes every original
    // but the failed images', and the upload.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let report: serde_json::Value = serde_json::from_str(&d.cli_ok(&["sweep", "--json"])).unwrap();
    assert_eq!((report["ran"].as_bool(), report["uploads"].as_u64()), (Some(true), Some(1)), "{report}");
    assert_eq!(report["originals"], N - BROKEN.len(), "{report}");
    let objects = d.dir.path().join("objects");
    let left = std::fs::read_dir(objects.join("batches/big/originals")).unwrap().count();
    assert_eq!(left, BROKEN.len());
    assert!(!objects.join("uploads/big.zip").exists());
}
