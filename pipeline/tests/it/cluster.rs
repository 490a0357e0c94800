//! A 3-node JetStream cluster with every stream replicated three times
//! (`nats.replicas = 3`, `nats.url` listing the three servers). A batch keeps its
//! guarantees while the node leading a stage's stream is killed, while the nodes
//! restart one by one as an upgrade would, and while two of the three are lost: every
//! entry recorded exactly once, no duplicate crop, only the planted dead letter.
//!
//! Each test prints, per failure injected, the time until progress resumed; and at
//! the end the images redelivered (attempts > 1) and the outcomes persist saw again
//! and skipped (duplicates prevented).

use std::time::{Duration, Instant};

use async_nats::jetstream;
use facepipe_core::topology::StageName;
use facepipe_runtime::store::Store;
use crate::support::{http_get, labelled_photos, Deployment, PhotoZip};
use facepipe_core::domain::{BatchStatus, ImageStatus};

const BATCH_TIMEOUT: Duration = Duration::from_secs(600);

/// One cluster at a time: three clusters' nine servers and twelve stages at once on two
/// cores stretch every election and ack past what the assertions are about.
pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A clustered deployment as the docs advise: more deliveries than on one server, since
/// a message in flight when leaders change can be delivered again without its worker failing.
async fn clustered() -> Deployment {
    Deployment::start_clustered(|t| {
        let s = &mut t.stages;
        for max_deliver in [&mut s.extract.max_deliver, &mut s.detect.max_deliver, &mut s.crop.max_deliver, &mut s.persist.max_deliver] {
            *max_deliver = (*max_deliver).max(6);
        }
    })
    .await
}
const PLANTED: &str = "planted-broken.jpg";

pub(crate) async fn jetstream_of(d: &Deployment) -> jetstream::Context {
    let servers: Vec<async_nats::ServerAddr> = d.nats_urls().split(',').map(|u| u.parse().unwrap()).collect();
    jetstream::new(async_nats::connect(servers.as_slice()).await.unwrap())
}

/// The node (index) leading `stream`, once the cluster has elected one.
pub(crate) async fn leader_of(js: &jetstream::Context, stream: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), js.get_stream(stream)).await {
            if let Ok(info) = s.info().await {
                if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    return leader.trim_start_matches('n').parse().unwrap();
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader for {stream}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every stream of the pipeline has a leader and all its replicas are current.
pub(crate) async fn wait_healthy(d: &Deployment, js: &jetstream::Context) {
    let streams: Vec<String> = StageName::ALL.iter().map(|s| d.topology.stream_name(*s)).chain([d.topology.dead_letter_stream()]).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    'again: loop {
        assert!(Instant::now() < deadline, "the cluster did not heal within 60 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for name in &streams {
            let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), js.get_stream(name)).await else { continue 'again };
            let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), s.info()).await else { continue 'again };
            let Some(cluster) = info.cluster.as_ref() else { continue 'again };
            if cluster.leader.is_none() || cluster.replicas.len() != 2 || !cluster.replicas.iter().all(|r| r.current && !r.offline) {
                continue 'again;
            }
        }
        return;
    }
}

async fn processed(d: &Deployment, batch: &str) -> i32 {
    d.db().await.batch_status(batch).await.unwrap().map(|s| s.processed).unwrap_or(0)
}

/// Waits until the batch has `at_least` outcomes recorded.
async fn wait_processed(d: &Deployment, batch: &str, at_least: i32) {
    let deadline = Instant::now() + BATCH_TIMEOUT;
    while processed(d, batch).await < at_least {
        assert!(Instant::now() < deadline, "stuck below {at_least} outcomes\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long after `since` the batch first records an outcome beyond `before`.
async fn resumed_after(d: &Deployment, batch: &str, before: i32, since: Instant) -> Duration {
    wait_processed(d, batch, before + 1).await;
    since.elapsed()
}

/// The end state after any failures: what one clean run would leave, and the
/// redeliveries and duplicates prevented along the way.
async fn check_end_state(d: &Deployment, js: &jetstream::Context, batch: &str, entries: usize) {
    let status = d.wait_for_batch(batch, BATCH_TIMEOUT).await;
    let results = d.db().await.results(batch).await.unwrap();
    let failures: Vec<String> = results
        .iter()
        .filter(|r| r.status == ImageStatus::Failed)
        .map(|r| format!("{} at {:?}: {}", r.entry, r.failed_stage, r.error.as_deref().unwrap_or("")))
        .collect();
    assert_eq!((status.status, status.failed), (BatchStatus::Completed, 1), "only the planted entry fails: {status:?}\n{failures:#?}");
    assert_eq!(results.len(), entries, "every entry recorded exactly once");
    assert_eq!(status.processed as usize, entries, "the counters count each once: {status:?}");
    let failed: Vec<_> = results.iter().filter(|r| r.status == ImageStatus::Failed).collect();
    assert!(failed.len() == 1 && failed[0].entry == PLANTED, "{failed:?}");
    let crop_keys: usize = results.iter().map(|r| r.crop_keys.len()).sum();
    let store = Store::open(&d.topology.object_store).unwrap();
    let crops = store.list(&format!("batches/{batch}/crops")).await.unwrap();
    assert_eq!(crops.len(), crop_keys, "no crop stored twice or left over");
    let mut dlq = js.get_stream(d.topology.dead_letter_stream()).await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 1, "the planted dead letter alone");
    let client = d.db.client().await;
    let redelivered: i64 = client
        .query_one("SELECT count(*) FROM images WHERE batch_id = $1 AND attempts > 1", &[&batch])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "end state: {entries} entries recorded once, {} crops, 1 dead letter; {redelivered} images redelivered, {} repeated outcomes skipped by persist",
        crops.len(),
        status.skipped
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_survives_losing_the_node_that_leads_a_stream() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = clustered().await;
    let js = jetstream_of(&d).await;
    wait_healthy(&d, &js).await;
    let (zip, entries) = batch_zip(&d);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "cluster"]).trim().to_string();

    for (stage, after) in [(StageName::Detect, 40), (StageName::Persist, 140)] {
        wait_processed(&d, &batch, after).await;
        let stream = d.topology.stream_name(stage);
        let leader = leader_of(&js, &stream).await;
        let before = processed(&d, &batch).await;
        let killed = Instant::now();
        d.node(leader).kill();
        let resumed = resumed_after(&d, &batch, before, killed).await;
        eprintln!("{stream}'s leader n{leader} killed at {before} outcomes: progress resumed after {resumed:.1?}");
        tokio::time::sleep(Duration::from_secs(10).saturating_sub(killed.elapsed())).await;
        d.node(leader).start_again();
        wait_healthy(&d, &js).await;
        eprintln!("n{leader} back and current {:.1?} after it was killed", killed.elapsed());
    }
    check_end_state(&d, &js, &batch, entries).await;
    assert!(d.cli_ok(&["stats"]).contains("detect"), "stats work against the cluster");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_every_node_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = clustered().await;
    let js = jetstream_of(&d).await;
    wait_healthy(&d, &js).await;
    let (zip, entries) = batch_zip(&d);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "rolling"]).trim().to_string();
    for node in 0..3 {
        wait_processed(&d, &batch, 30 + 60 * node as i32).await;
        let before = processed(&d, &batch).await;
        let stopped = Instant::now();
        d.node(node).terminate();
        let resumed = resumed_after(&d, &batch, before, stopped).await;
        d.node(node).start_again();
        wait_healthy(&d, &js).await;
        eprintln!("n{node} stopped (SIGTERM) at {before} outcomes: progress resumed after {resumed:.1?}; back and current after {:.1?}", stopped.elapsed());
    }
    check_end_state(&d, &js, &batch, entries).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_two_of_three_nodes_pauses_the_batch_and_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = clustered().await;
    // A detect process whose /readyz the test reads, in place of the harness's.
    while d.count_in_logs("stage started stage=detect") == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let detect = d.stages.iter().position(|(s, _)| *s == StageName::Detect).unwrap();
    d.signal(detect, libc::SIGTERM);
    assert_eq!(d.stages.remove(detect).1.wait().unwrap().code(), Some(0));
    let port = d.start_stage_with_metrics(StageName::Detect);
    let js = jetstream_of(&d).await;
    wait_healthy(&d, &js).await;
    let (zip, entries) = batch_zip(&d);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "quorum"]).trim().to_string();
    wait_processed(&d, &batch, 60).await;

    let lost = Instant::now();
    d.node(1).kill();
    d.node(2).kill();
    // In-flight work may still land; then nothing moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled_at = processed(&d, &batch).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        let (code, body) = http_get(port, "/readyz");
        if code == 503 && body.contains("JetStream") {
            break body;
        }
        assert!(Instant::now() < deadline, "/readyz never said why: {code} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("two nodes lost: detect's /readyz answers 503 {}", why.trim());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(processed(&d, &batch).await, stalled_at, "no progress without a quorum");
    assert_ne!(d.db().await.batch_status(&batch).await.unwrap().unwrap().status, BatchStatus::Completed);

    let down = lost.elapsed();
    let back = Instant::now();
    d.node(1).start_again();
    d.node(2).start_again();
    let resumed = resumed_after(&d, &batch, stalled_at, back).await;
    eprintln!("quorum back after {down:.1?} down: progress resumed {resumed:.1?} after the nodes restarted");
    check_end_state(&d, &js, &batch, entries).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "detect not ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every labelled photo twice, and one planted bad entry; its entry count.
fn batch_zip(d: &Deployment) -> (std::path::PathBuf, usize) {
    PhotoZip::of(&labelled_photos()).copies(2).with(PLANTED, *b"\xFF\xD8\xFF this is no JPEG").write(&d.dir.path().join("cluster.zip"))
}
