//! Nothing lost even when the broker loses it: messages purged, deleted one by one, a
//! server back with an empty store, and the waiting that must not count as stalling.
//! PostgreSQL is the ledger; the reconciler (run by persist, here every second and after
//! 2 s stalled) publishes again what the streams no longer hold. In every case the
//! batch completes, every entry has exactly one outcome, and the crops in the store
//! are exactly the recorded ones.
//!
//! Each test prints one `broker loss:` line: the fault, the time from it to the
//! batch's completion, the images re-driven, and the duplicate outcomes persist absorbed.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use facepipe_core::domain::{Priority, StageName};
use facepipe_core::messages::{self, DetectJob, ImageRef};
use facepipe_core::telemetry;
use facepipe_core::topology::Topology;

use crate::support::{http_get, prometheus_counter, labelled_photos, Deployment, PhotoZip};

/// The reconciler looks every second and re-drives what stayed stalled for 2 s; a
/// message un-acked for 5 s is delivered again.
pub(crate) fn heal_quickly(t: &mut Topology) {
    t.reconcile.every = Duration::from_secs(1);
    t.reconcile.stalled_after = Some(Duration::from_secs(2));
    let s = &mut t.stages;
    for ack_wait in [&mut s.extract.ack_wait, &mut s.detect.ack_wait, &mut s.crop.ack_wait, &mut s.persist.ack_wait] {
        *ack_wait = Duration::from_secs(5);
    }
}

/// A JetStream context on the deployment's servers.
pub(crate) async fn jetstream(d: &Deployment) -> jetstream::Context {
    jetstream::new(async_nats::connect(d.nats_urls()).await.unwrap())
}

/// Messages in `stage`'s stream now.
pub(crate) async fn queued(js: &jetstream::Context, d: &Deployment, stage: StageName) -> u64 {
    let mut stream = js.get_stream(d.topology.stream_name(stage)).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Purges `stage`'s stream (as `nats stream purge` does); how many messages it dropped.
pub(crate) async fn purge(js: &jetstream::Context, d: &Deployment, stage: StageName) -> u64 {
    let stream = js.get_stream(d.topology.stream_name(stage)).await.unwrap();
    stream.purge().await.unwrap().purged
}

/// Index in `d.stages` of the (first) process of `stage`.
pub(crate) fn process_of(d: &Deployment, stage: StageName) -> usize {
    d.stages.iter().position(|(s, _)| *s == stage).expect("a process of the stage")
}

/// Duplicate outcomes persist recognized and skipped (the deployment's persist process started with metrics).
pub(crate) fn absorbed(d: &Deployment) -> f64 {
    prometheus_counter(d.metrics_port(StageName::Persist), telemetry::MESSAGES, &["stage=\"persist\"", "outcome=\"skipped\""])
}

/// A ZIP of every labelled photo `copies` times; its path and entry count.
pub(crate) fn photo_batch(d: &Deployment, copies: usize) -> (std::path::PathBuf, usize) {
    PhotoZip::of(&labelled_photos()).copies(copies).write(&d.dir.path().join("batch.zip"))
}

/// Waits until `check` holds of the batch's summary, polling; panics with the logs after `timeout`.
pub(crate) async fn wait_until(d: &Deployment, batch: &str, timeout: Duration, what: &str, check: impl Fn(&facepipe_ledger::BatchSummary) -> bool) {
    let db = d.db().await;
    let start = Instant::now();
    loop {
        let summary = db.batch_status(batch).await.unwrap();
        if summary.as_ref().is_some_and(&check) {
            return;
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}; last seen {summary:?}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Purges `stage`'s stream while the batch runs: the stage is frozen (SIGSTOP) until its
/// stream holds at least `lost` messages, the stream is purged, and the stage goes on.
async fn purge_while_frozen(stage: StageName, lost: u64) {
    let mut d = Deployment::start_with(heal_quickly, Vec::new(), Vec::new(), true).await;
    let js = jetstream(&d).await;
    let (zip, entries) = photo_batch(&d, 1);
    let frozen = process_of(&d, stage);
    d.signal(frozen, libc::SIGSTOP);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "loss"]).trim().to_string();
    let start = Instant::now();
    while queued(&js, &d, stage).await < lost {
        assert!(start.elapsed() < Duration::from_secs(120), "{stage}'s stream never held {lost} messages\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let purged = purge(&js, &d, stage).await;
    let fault = Instant::now();
    d.signal(frozen, libc::SIGCONT);
    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    let healed = fault.elapsed();
    let results = d.check_every_entry_once(&batch, entries, 0).await;
    assert!(done.redriven > 0, "{purged} messages purged, and nothing re-driven: {done:?}");
    assert!(done.redriven as u64 <= purged + d.topology.stage(stage).concurrency as u64, "re-drove more than was lost: {done:?}");
    assert!(done.stalled_since.is_none(), "a completed batch is not stalled: {done:?}");
    eprintln!(
        "broker loss: {} purged mid-batch ({purged} messages): healed in {:.1}s; {} images re-driven, {} duplicate outcomes absorbed; {} results",
        d.topology.stream_name(stage),
        healed.as_secs_f64(),
        done.redriven,
        absorbed(&d),
        results.len()
    );
    d.stop_stages();
}

#[tokio::test(flavor = "multi_thread")]
async fn detect_stream_purged_mid_batch_is_redriven() {
    purge_while_frozen(StageName::Detect, 40).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crop_stream_purged_mid_batch_is_redriven() {
    purge_while_frozen(StageName::Crop, 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn persist_stream_purged_mid_batch_is_redriven() {
    purge_while_frozen(StageName::Persist, 20).await;
}

/// The extract job is lost part way through ingest (its process killed, its stream
/// purged): the reconciler publishes the recorded job again once what was registered has
/// flowed through, and extract resumes without registering an entry twice.
#[tokio::test(flavor = "multi_thread")]
async fn extract_job_lost_mid_ingest_is_sent_again_and_resumes() {
    let mut d = Deployment::start_with(
        |t| {
            heal_quickly(t);
            // One entry at a time, so the kill lands part way through.
            t.stages.extract.params.parallelism = 1;
        },
        Vec::new(),
        Vec::new(),
        true,
    )
    .await;
    let js = jetstream(&d).await;
    let (zip, entries) = photo_batch(&d, 2);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "loss"]).trim().to_string();
    let client = d.db.client().await;
    let start = Instant::now();
    loop {
        let registered: i64 = client.query_one("SELECT count(*) FROM images WHERE batch_id = $1", &[&batch]).await.unwrap().get(0);
        if registered >= 20 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "extract registered nothing\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let extract = process_of(&d, StageName::Extract);
    d.signal(extract, libc::SIGKILL);
    crate::support::wait_exit(&mut d.stages[extract].1, Duration::from_secs(10)).expect("SIGKILL ends extract");
    let purged = purge(&js, &d, StageName::Extract).await;
    assert_eq!(purged, 1, "the job was in the stream, un-acked");
    let registered: i64 = client.query_one("SELECT count(*) FROM images WHERE batch_id = $1", &[&batch]).await.unwrap().get(0);
    assert!((registered as usize) < entries, "the kill must land part way through ingest: {registered} of {entries} registered");
    let fault = Instant::now();
    assert_eq!(d.restart_exited(), 1);

    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    let healed = fault.elapsed();
    d.check_every_entry_once(&batch, entries, 0).await;
    let jobs: i32 = client.query_one("SELECT redrives FROM batches WHERE batch_id = $1", &[&batch]).await.unwrap().get(0);
    assert_eq!(jobs, 1, "the job was published again once");
    assert_eq!(d.count_in_logs("re-drove the batch's extract job"), 1, "{}", d.logs());
    eprintln!(
        "broker loss: extract job lost after {registered} of {entries} entries: healed in {:.1}s; 1 job re-driven, \
         {} images re-driven, {} duplicate outcomes absorbed",
        healed.as_secs_f64(),
        done.redriven,
        absorbed(&d)
    );
    d.stop_stages();
}

/// Messages deleted one at a time from the middle of the detect and crop streams while
/// the batch flows (`nats stream rmm`): each lost image is re-driven once the rest of
/// its batch has flowed through.
#[tokio::test(flavor = "multi_thread")]
async fn messages_deleted_one_by_one_are_redriven() {
    let mut d = Deployment::start_with(
        |t| {
            heal_quickly(t);
            t.stages.detect.concurrency = 1;
        },
        Vec::new(),
        Vec::new(),
        true,
    )
    .await;
    let js = jetstream(&d).await;
    let (zip, entries) = photo_batch(&d, 1);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "loss"]).trim().to_string();
    let fault = Instant::now();
    let mut deleted = 0u64;
    let mut rng = rand::rng();
    let db = d.db().await;
    while deleted < 25 {
        let status = db.batch_status(&batch).await.unwrap();
        assert!(status.as_ref().is_none_or(|s| s.processed < s.image_count.unwrap_or(i32::MAX)), "the batch finished before 25 deletions: {status:?}");
        for stage in [StageName::Detect, StageName::Crop] {
            let mut stream = js.get_stream(d.topology.stream_name(stage)).await.unwrap();
            let state = stream.info().await.unwrap().state.clone();
            if state.messages < 3 {
                continue;
            }
            // Not the first: a worker may hold it; any other is waiting.
            let seq = rand::Rng::random_range(&mut rng, state.first_sequence + 1..=state.last_sequence);
            if stream.delete_message(seq).await.is_ok() {
                deleted += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    let healed = fault.elapsed();
    d.check_every_entry_once(&batch, entries, 0).await;
    assert!(done.redriven as u64 >= 1 && done.redriven as u64 <= deleted, "{deleted} deleted: {done:?}");
    eprintln!(
        "broker loss: {deleted} messages deleted one by one: healed in {:.1}s from the first; {} images re-driven, {} duplicate outcomes absorbed",
        healed.as_secs_f64(),
        done.redriven,
        absorbed(&d)
    );
    d.stop_stages();
}

/// The scenario, as an operator meets it: the detect stream purged at some
/// images processed, then the server SIGKILLed and started on an empty store. Until
/// `pipeline apply` runs, every stage says on `/readyz` and in its log that its stream
/// is gone and what to run; then the batch completes.
#[tokio::test(flavor = "multi_thread")]
async fn purge_then_a_broker_back_empty_then_apply_completes_the_batch() {
    let mut d = Deployment::start_with(
        |t| {
            heal_quickly(t);
            t.stages.detect.concurrency = 1;
        },
        Vec::new(),
        Vec::new(),
        true,
    )
    .await;
    let (zip, entries) = photo_batch(&d, 1);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "loss"]).trim().to_string();
    wait_until(&d, &batch, Duration::from_secs(120), "20 images processed", |s| s.processed >= 20).await;
    let js = jetstream(&d).await;
    let purged = purge(&js, &d, StageName::Detect).await;
    let fault = Instant::now();
    // The status says stalled before anything is re-driven.
    wait_until(&d, &batch, Duration::from_secs(30), "marked stalled", |s| s.stalled_since.is_some()).await;
    let status = d.cli_ok(&["status", &batch]);
    assert!(status.contains("stalled"), "{status}");

    d.nats.wipe();
    let wiped = Instant::now();
    for (stage, port) in d.metrics_ports.clone() {
        let start = Instant::now();
        loop {
            let (code, body) = http_get(port, "/readyz");
            if code == 503 && body.contains("run `pipeline apply`") {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{stage} /readyz after the wipe: {code} {body}\n{}", d.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(d.count_in_logs("run `pipeline apply`") >= StageName::ALL.len(), "each stage says so in its log\n{}", d.logs());
    d.cli_ok(&["apply"]);
    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    d.check_every_entry_once(&batch, entries, 0).await;
    for (stage, port) in d.metrics_ports.clone() {
        let (code, body) = http_get(port, "/readyz");
        assert_eq!(code, 200, "{stage} ready again after apply: {body}");
    }
    assert!(done.redriven > 0);
    eprintln!(
        "broker loss: FACES_DETECT purged ({purged} messages), then the server wiped and applied: healed in {:.1}s from the purge \
         ({:.1}s from the wipe); {} images re-driven, {} duplicate outcomes absorbed",
        fault.elapsed().as_secs_f64(),
        wiped.elapsed().as_secs_f64(),
        done.redriven,
        absorbed(&d)
    );
    d.stop_stages();
}

/// Waiting is not stalling: a batch of 100,000 pending images, unchanged for an hour,
/// whose 100,000 detect jobs wait in the stream, is left alone by every look. Once the
/// stream is purged, the same batch is found stalled at once and re-driven at the next
/// look: the test can tell the two apart.
#[tokio::test(flavor = "multi_thread")]
async fn a_deep_backlog_older_than_stalled_after_redrives_nothing() {
    const IMAGES: i64 = 100_000;
    let d = Deployment::start_stages(
        |t| {
            heal_quickly(t);
            t.reconcile.stalled_after = Some(Duration::from_secs(1));
        },
        Vec::new(),
        Vec::new(),
        false,
        &[],
    )
    .await;
    let batch = "backlog";
    let client = d.db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO batches (batch_id, project_id, source, status, image_count, updated_at)
             VALUES ('{batch}', 'p', 'zip', 'processing', {IMAGES}, now() - interval '1 hour');
             INSERT INTO images (batch_id, image_id, entry_name, original_key, updated_at)
             SELECT '{batch}', lpad(n::text, 8, '0'), n || '.jpg', 'o/' || n, now() - interval '1 hour' FROM generate_series(1, {IMAGES}) n;
             ANALYZE images;"
        ))
        .await
        .unwrap();
    // The reconciler's page of pending images is a seek on an index, however many there are.
    let plan: Vec<String> = client
        .query(
            "EXPLAIN SELECT image_id, original_key, error FROM images
             WHERE batch_id = $1 AND status = 'pending' AND image_id > $2 ORDER BY image_id LIMIT 1000",
            &[&batch, &"00050000"],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A keyed walk in index order: no sequential scan, no sort of the batch's images.
    assert!(plan.iter().any(|l| l.contains("Index Scan")), "{plan:#?}");
    assert!(!plan.iter().any(|l| l.contains("Seq Scan") || l.contains("Sort")), "{plan:#?}");

    let js = jetstream(&d).await;
    let subject = d.topology.batch_subject(StageName::Detect, Priority::default(), batch);
    let client_nats = async_nats::connect(&d.nats.url).await.unwrap();
    for n in 1..=IMAGES {
        let image = ImageRef::new(batch.to_string(), format!("{n:08}"), Priority::default());
        let job = DetectJob { image, key: format!("o/{n}") };
        client_nats.publish(subject.clone(), messages::encode(&job)).await.unwrap();
    }
    client_nats.flush().await.unwrap();
    let start = Instant::now();
    while queued(&js, &d, StageName::Detect).await < IMAGES as u64 {
        assert!(start.elapsed() < Duration::from_secs(60), "the backlog never reached the stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let look = |d: &Deployment| -> serde_json::Value { serde_json::from_str(&d.cli_ok(&["reconcile", "--once", "--json"])).unwrap() };
    let mut waiting = Duration::ZERO;
    for _ in 0..2 {
        let one = Instant::now();
        let report = look(&d);
        waiting = waiting.max(one.elapsed());
        assert_eq!(report["ran"], true, "{report}");
        assert_eq!(report["stalled"], serde_json::json!([]), "waiting is not stalling: {report}");
        assert_eq!(report["redriven_images"], 0, "{report}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let row = client.query_one("SELECT stalled_at IS NULL, redriven FROM batches WHERE batch_id = $1", &[&batch]).await.unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, i32>(1)), (true, 0));
    assert_eq!(queued(&js, &d, StageName::Detect).await, IMAGES as u64, "nothing published again");

    // The control: the same batch with its messages gone is stalled, then re-driven.
    purge(&js, &d, StageName::Detect).await;
    let dry = d.cli_ok(&["reconcile", "--dry-run"]);
    assert!(dry.contains(&format!("{batch}  processing")) && dry.contains("would be marked stalled"), "{dry}");
    let row = client.query_one("SELECT stalled_at IS NULL FROM batches WHERE batch_id = $1", &[&batch]).await.unwrap();
    assert!(row.get::<_, bool>(0), "a dry run changes nothing");
    let report = look(&d);
    assert_eq!(report["stalled"][0]["batch_id"], batch, "{report}");
    assert_eq!(report["stalled"][0]["redriven"], false, "marked first: {report}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let redrive = Instant::now();
    let report = look(&d);
    let redrive = redrive.elapsed();
    assert_eq!(report["redriven_images"], IMAGES, "{report}");
    assert_eq!(queued(&js, &d, StageName::Detect).await, IMAGES as u64);
    eprintln!(
        "broker loss: a backlog of {IMAGES} waiting images, an hour old: 2 looks re-drove nothing (the slower took {:.2}s, \
         the CLI's start included); purged, all {IMAGES} re-driven in one look of {:.1}s",
        waiting.as_secs_f64(),
        redrive.as_secs_f64()
    );
}

/// The deployment files run nats-server with `deploy/nats.conf`, and with it JetStream
/// syncs to disk before it acknowledges (its monitoring endpoint says so).
#[tokio::test]
async fn the_deployment_files_make_jetstream_sync_before_it_acknowledges() {
    let root = crate::support::repo_root();
    let conf = std::fs::read_to_string(root.join("deploy/nats.conf")).unwrap();
    let compose = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    let cluster = std::fs::read_to_string(root.join("deploy/compose.cluster.yaml")).unwrap();
    assert_eq!(compose.matches("\"-c\", \"/etc/nats/nats.conf\"").count(), 1, "compose.yaml's server reads it");
    assert_eq!(cluster.matches("\"-c\", \"/etc/nats/nats.conf\"").count(), 3, "each of the cluster's three nodes reads it");
    assert_eq!(cluster.matches("./deploy/nats.conf:/etc/nats/nats.conf:ro").count(), 2, "nats-2 and nats-3 mount it (nats has compose.yaml's mount)");
    let (server, monitor) = crate::support::NatsServer::start_monitored(&conf);
    let varz: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{monitor}/varz")).await.unwrap().json().await.unwrap();
    assert_eq!(varz["jetstream"]["config"]["sync_always"], true, "{}", varz["jetstream"]);
    drop(server);
}
