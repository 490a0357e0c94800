//! Delivery guarantees that need a planted fault: a message whose worker
//! crashes on every delivery must end as a dead letter and a recorded failure,
//! and a replay must bring it back once the fault is gone.

use std::time::{Duration, Instant};

use facepipe_runtime::faults::{FAULT_CRASH_ON_ENV, FAULT_SLOW_ON_ENV};
use facepipe_core::topology::StageName;
use crate::support::{shared_dir, write_zip, Deployment};
use facepipe_core::domain::{BatchStatus, ImageStatus};

#[tokio::test(flavor = "multi_thread")]
async fn crash_on_every_delivery_becomes_a_dead_letter_then_replays() {
    // Only the detect message of the batch's first image carries this text.
    let needle = "crash-me-1/originals/0000000";
    let mut d = Deployment::start_with_env(
        |t| {
            t.stages.detect.ack_wait = Duration::from_secs(2);
            t.stages.detect.max_deliver = 2;
            // One message in flight: a crash takes down every message a process holds,
            // so with more slots the innocent second image could share the crashes.
            t.stages.detect.concurrency = 1;
        },
        vec![(FAULT_CRASH_ON_ENV.into(), needle.into())],
    )
    .await;
    let photo = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    let zip = d.dir.path().join("crash.zip");
    write_zip(&zip, &[("first.png".into(), photo.clone()), ("second.png".into(), photo)]);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "crash-me-1"]);

    // Keep restarting the crashed detect process, as a supervisor would.
    let db = d.db().await;
    let started = Instant::now();
    let mut crashes = 0;
    let status = loop {
        crashes += d.restart_exited();
        let s = db.batch_status("crash-me-1").await.unwrap();
        if let Some(s) = s.filter(|s| s.status == BatchStatus::Completed) {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "batch never completed\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(crashes, 2, "one crash per delivery, max_deliver = 2");
    assert_eq!((status.processed, status.failed), (2, 1));
    let results = db.results("crash-me-1").await.unwrap();
    assert_eq!(results[0].status, ImageStatus::Failed);
    assert!(results[0].error.as_deref().unwrap().contains("without an ack"), "{:?}", results[0]);
    assert_eq!(results[1].status, ImageStatus::Cropped);

    let listed = d.cli_ok(&["dead-letters", "list", "--batch", "crash-me-1", "--json"]);
    let letters: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 1, "{listed}");
    assert_eq!(letters[0]["stage"], "detect");
    assert_eq!(letters[0]["attempts"], 2);
    assert_eq!(letters[0]["image_id"], "0000000");
    assert!(d.cli_ok(&["dead-letters", "list", "--batch", "other"]).is_empty());

    // Fix the fault (stage processes without the hook) and replay.
    d.stage_env.clear();
    let codes = d.stop_stages();
    assert!(codes.iter().all(|(_, code)| *code == Some(0)), "{codes:?}");
    for stage in StageName::ALL {
        d.start_stage(stage);
    }
    let refused = d.cli(&["dead-letters", "replay"]);
    assert!(!refused.status.success(), "replay needs a selection");
    let out = d.cli_ok(&["dead-letters", "replay", "--batch", "crash-me-1"]);
    assert!(out.contains("replayed 1"), "{out}");

    let started = Instant::now();
    loop {
        let s = db.batch_status("crash-me-1").await.unwrap().unwrap();
        if s.status == BatchStatus::Completed && s.failed == 0 {
            assert_eq!(s.processed, 2);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "replay did not complete the image: {s:?}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let results = db.results("crash-me-1").await.unwrap();
    assert_eq!(results[0].status, ImageStatus::Cropped);
    assert!(d.cli_ok(&["dead-letters", "list"]).is_empty(), "a replayed letter leaves the stream");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_image_keeps_its_message_with_in_progress_acks() {
    // Three times longer than ack_wait: without in-progress acks it would be redelivered.
    let mut d = Deployment::start_with_env(
        |t| {
            t.stages.detect.ack_wait = Duration::from_secs(2);
            t.stages.detect.concurrency = 2;
        },
        vec![(FAULT_SLOW_ON_ENV.into(), "slow-1/originals/0000000=6000".into())],
    )
    .await;
    // A second detect replica that would take a redelivered message.
    d.start_stage(StageName::Detect);
    let photo = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    let zip = d.dir.path().join("slow.zip");
    write_zip(&zip, &[("slow.png".into(), photo.clone()), ("fast.png".into(), photo)]);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "slow-1"]);
    let status = d.wait_for_batch("slow-1", Duration::from_secs(60)).await;
    assert_eq!((status.status, status.processed, status.failed), (BatchStatus::Completed, 2, 0));
    // detect and crop both see the key in their message; each handles it once.
    assert_eq!(d.count_in_logs("fault injection: slow message"), 2, "{}", d.logs());
    assert_eq!(d.count_in_logs("redelivered message"), 0, "{}", d.logs());
    let results = d.db().await.results("slow-1").await.unwrap();
    assert!(results.iter().all(|r| r.status == ImageStatus::Cropped && r.attempts == 1), "{results:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stage_waiting_for_postgres_at_start_stops_cleanly_on_sigterm() {
    let d = Deployment::start(|_| {}).await;
    // A topology whose database port has nothing listening.
    let mut unreachable = d.topology.clone();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    unreachable.postgres.url = format!("postgres://facepipe:facepipe@127.0.0.1:{closed_port}/x").parse().unwrap();
    let path = d.dir.path().join("unreachable.toml");
    std::fs::write(&path, toml::to_string(&unreachable).unwrap()).unwrap();
    let log = d.dir.path().join("waiting.log");
    let mut persist = std::process::Command::new(crate::support::bin("persist"))
        .arg("--topology")
        .arg(&path)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log).unwrap().contains("PostgreSQL not ready") {
        assert!(started.elapsed() < Duration::from_secs(30), "never waited for PostgreSQL");
        assert!(persist.try_wait().unwrap().is_none(), "exited instead of waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(persist.id() as i32, libc::SIGTERM) };
    let code = crate::support::wait_exit(&mut persist, Duration::from_secs(10)).expect("ignored SIGTERM while waiting");
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn extract_job_that_crashes_every_time_fails_its_batch() {
    let mut d = Deployment::start_with_env(
        |t| {
            t.stages.extract.ack_wait = Duration::from_secs(2);
            t.stages.extract.max_deliver = 2;
        },
        vec![(FAULT_CRASH_ON_ENV.into(), "crash-extract".into())],
    )
    .await;
    let photo = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    let zip = d.dir.path().join("x.zip");
    write_zip(&zip, &[("a.png".into(), photo)]);
    // Published by hand without a batch id: the batch id is derived from the message.
    let client = async_nats::connect(&d.nats.url).await.unwrap();
    let job = format!(r#"{{"project_id": "crash-extract", "zip": "{}"}}"#, zip.display());
    client.publish("faces.extract", job.into()).await.unwrap();
    client.flush().await.unwrap();

    let c = d.db.client().await;
    let started = Instant::now();
    let (status, error) = loop {
        d.restart_exited();
        let rows = c.query("SELECT status, error FROM batches WHERE project_id = 'crash-extract'", &[]).await.unwrap();
        if let Some(row) = rows.first().filter(|r| r.get::<_, String>(0) == "failed") {
            assert_eq!(rows.len(), 1);
            break (row.get::<_, String>(0), row.get::<_, Option<String>>(1));
        }
        assert!(started.elapsed() < Duration::from_secs(60), "batch never failed\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("without an ack"));
    let letters = d.cli_ok(&["dead-letters", "list", "--json"]);
    assert_eq!(letters.lines().count(), 1, "{letters}");
    assert!(letters.contains(r#""stage":"extract""#), "{letters}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_postgres() {
    let proxy = crate::support::PgProxy::start().await;
    let mut d = Deployment::start(|t| t.postgres.url = proxy.url_for(&t.postgres.url)).await;
    let port = d.start_stage_with_metrics(StageName::Persist);
    let wait_for = |want: u16| {
        let started = Instant::now();
        loop {
            if let Ok(conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                drop(conn);
                if crate::support::http_get(port, "/readyz").0 == want {
                    return;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "/readyz never answered {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(200);
    proxy.set_down(true);
    wait_for(503);
    assert_eq!(crate::support::http_get(port, "/healthz").0, 200, "alive while not ready");
    proxy.set_down(false);
    wait_for(200);
}
