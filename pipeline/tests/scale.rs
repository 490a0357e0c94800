//! Scaling a stage out is starting more processes: every replica binds the
//! stage's one durable consumer and takes a share of the work, and the batch
//! ends exactly as it does with one process.

mod support;

use std::collections::BTreeMap;

use facepipe_core::topology::StageName;
use support::{labelled_photos, prometheus_counter, shared_dir, write_zip, Deployment};

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

    let faces_dir = shared_dir().join("data/faces");
    let entries: Vec<(String, Vec<u8>)> = labelled_photos()
        .iter()
        .map(|p| (p.file.clone(), std::fs::read(faces_dir.join(&p.file)).unwrap()))
        .collect();
    let zip = d.dir.path().join("faces.zip");
    write_zip(&zip, &entries);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "scaled"]);
    let status = d.wait_for_batch("scaled", std::time::Duration::from_secs(300)).await;
    assert_eq!((status.status.as_str(), status.processed), ("completed", entries.len() as i32));

    // Every replica did part of the work, and together exactly all of it.
    for port in &ports {
        assert_eq!(support::http_get(*port, "/healthz").0, 200);
        assert_eq!(support::http_get(*port, "/readyz"), (200, "ready\n".to_string()));
        assert_eq!(support::http_get(*port, "/nothing").0, 404);
    }
    let shares: Vec<f64> = ports
        .iter()
        .map(|p| prometheus_counter(*p, "facepipe_messages_total", &[r#"stage="detect""#, r#"outcome="ok""#]))
        .collect();
    eprintln!("detect shares: {shares:?}");
    assert!(shares.iter().all(|s| *s >= 5.0), "each replica took a share: {shares:?}");
    assert_eq!(shares.iter().sum::<f64>(), entries.len() as f64);

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
    let outcome = |rows: Vec<facepipe_runtime::db::ImageResult>| -> BTreeMap<String, (String, usize, Vec<String>)> {
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
    assert_eq!(status.status, "completed");
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert_eq!(support::wait_exit(&mut up, std::time::Duration::from_secs(30)), Ok(Some(0)));
}
