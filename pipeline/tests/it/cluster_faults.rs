//! Faults of a 3-node cluster beyond kills: a node's store corrupted, and partitions.
//! For the partitions the nodes, and one detect process, run on test hosts in network
//! namespaces the test makes ([`Network`]); extract, crop and persist run here (they
//! need PostgreSQL on loopback) and reach the hosts over the test network's own link.
//! Cutting a host's link drops everything it sends and is sent, as a pulled cable does.
//! In every case the batch completes, every entry has exactly one outcome, and the
//! crops stored are the recorded ones; each test prints what it cost.

use std::path::Path;
use std::time::{Duration, Instant};

use facepipe_core::domain::StageName;
use facepipe_core::topology::Topology;

use crate::broker_loss::{absorbed, heal_quickly, photo_batch, wait_until};
use crate::cluster::{jetstream_of, leader_of, ONE_AT_A_TIME};
use crate::support::{Deployment, Network};

/// The cluster settings of `cluster.rs` (more deliveries: leader changes may deliver a
/// message again), healing quickly, and one detect slot per process so the batch lasts.
fn cluster_settings(t: &mut Topology) {
    heal_quickly(t);
    let s = &mut t.stages;
    for max_deliver in [&mut s.extract.max_deliver, &mut s.detect.max_deliver, &mut s.crop.max_deliver, &mut s.persist.max_deliver] {
        *max_deliver = (*max_deliver).max(6);
    }
    s.detect.concurrency = 1;
}

/// Every `.blk` file (JetStream's message blocks) under `dir`.
fn message_blocks(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            message_blocks(&path, out);
        } else if path.extension().is_some_and(|e| e == "blk") {
            out.push(path);
        }
    }
}

/// The node leading the detect stream is killed, every message block of its store cut
/// to half its length (a torn write, a bad disk), and started again.
#[tokio::test(flavor = "multi_thread")]
async fn a_nodes_truncated_message_blocks_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = Deployment::start_clustered_on(&[None, None, None], cluster_settings, &[StageName::Extract, StageName::Detect, StageName::Crop]).await;
    d.start_stage_with_metrics(StageName::Persist);
    let js = jetstream_of(&d).await;
    let (zip, entries) = photo_batch(&d, 1);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "blk"]).trim().to_string();
    wait_until(&d, &batch, Duration::from_secs(180), "20 images processed", |s| s.processed >= 20).await;
    let leader = leader_of(&js, &d.topology.stream_name(StageName::Detect)).await;
    let node = d.node(leader);
    node.kill();
    let mut blocks = Vec::new();
    message_blocks(&node.jetstream_dir(), &mut blocks);
    assert!(!blocks.is_empty(), "the node stored message blocks");
    for block in &blocks {
        let file = std::fs::OpenOptions::new().write(true).open(block).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len / 2).unwrap();
    }
    let fault = Instant::now();
    node.start_again();
    let done = d.wait_for_batch(&batch, Duration::from_secs(300)).await;
    d.check_every_entry_once(&batch, entries, 0).await;
    eprintln!(
        "cluster fault: n{leader} (leading FACES_DETECT) killed, its {} message blocks cut in half, started again: \
         completed {:.1}s later; {} images re-driven, {} duplicate outcomes absorbed",
        blocks.len(),
        fault.elapsed().as_secs_f64(),
        done.redriven,
        absorbed(&d)
    );
    d.stop_stages();
}

/// A deployment whose three nodes and one detect process run on test hosts; a second
/// detect process, extract, crop and persist run here.
async fn partitioned_deployment(net: &mut Network) -> (Deployment, Vec<facepipe_testkit::Host>, facepipe_testkit::Host) {
    let nodes: Vec<_> = (0..3).map(|_| net.add_host()).collect();
    let detect_host = net.add_host();
    let placement: Vec<Option<&facepipe_testkit::Host>> = nodes.iter().map(Some).collect();
    let mut d = Deployment::start_clustered_on(&placement, cluster_settings, &[StageName::Extract, StageName::Crop]).await;
    d.start_stage_with_metrics(StageName::Persist);
    d.start_stage_on(StageName::Detect, &detect_host);
    d.start_stage(StageName::Detect);
    (d, nodes, detect_host)
}

/// The host of one detect process is cut off, while it holds un-acked messages, for
/// longer than `ack_wait`: its messages go to the other detect process; when the host
/// comes back, whatever it still sends is a duplicate the pipeline absorbs.
#[tokio::test(flavor = "multi_thread")]
async fn a_detect_host_cut_off_longer_than_ack_wait_loses_and_doubles_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut net = Network::new();
    let (mut d, _nodes, detect_host) = partitioned_deployment(&mut net).await;
    let (zip, entries) = photo_batch(&d, 1);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "cut"]).trim().to_string();
    wait_until(&d, &batch, Duration::from_secs(180), "20 images processed", |s| s.processed >= 20).await;
    net.cut(&detect_host);
    let cut = Instant::now();
    let ack_wait = d.topology.stages.detect.ack_wait;
    tokio::time::sleep(ack_wait * 2 + Duration::from_secs(2)).await;
    net.heal(&detect_host);
    let done = d.wait_for_batch(&batch, Duration::from_secs(300)).await;
    d.check_every_entry_once(&batch, entries, 0).await;
    let redelivered = d.count_in_logs("redelivered message");
    assert!(redelivered > 0, "the cut host held messages, which went to the other detect process\n{}", d.logs());
    eprintln!(
        "partition: a detect host cut off for {:.0}s (ack_wait {ack_wait:?}): completed {:.1}s after the cut; {redelivered} redeliveries, \
         {} images re-driven, {} duplicate outcomes absorbed",
        (ack_wait * 2 + Duration::from_secs(2)).as_secs_f64(),
        cut.elapsed().as_secs_f64(),
        done.redriven,
        absorbed(&d)
    );
    d.stop_stages();
}

/// One NATS node is cut off from the other two (and from every client) mid-batch, then
/// joins again: the two keep a quorum, the clients connected to the lost node fail over,
/// and the node catches up when it is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_nats_node_cut_off_from_the_other_two_loses_and_doubles_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut net = Network::new();
    let (mut d, nodes, _detect_host) = partitioned_deployment(&mut net).await;
    let js = jetstream_of(&d).await;
    let (zip, entries) = photo_batch(&d, 1);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "cut"]).trim().to_string();
    wait_until(&d, &batch, Duration::from_secs(180), "20 images processed", |s| s.processed >= 20).await;
    // The node leading the detect stream: the cut forces an election too.
    let leader = leader_of(&js, &d.topology.stream_name(StageName::Detect)).await;
    net.cut(&nodes[leader]);
    let cut = Instant::now();
    let before: i32 = d.db().await.batch_status(&batch).await.unwrap().unwrap().processed;
    wait_until(&d, &batch, Duration::from_secs(120), "progress with a node cut off", |s| s.processed >= before + 10).await;
    let resumed = cut.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    net.heal(&nodes[leader]);
    let done = d.wait_for_batch(&batch, Duration::from_secs(300)).await;
    d.check_every_entry_once(&batch, entries, 0).await;
    eprintln!(
        "partition: n{leader} (leading FACES_DETECT) cut off from the other two: 10 more images done {:.1}s after the cut; \
         completed {:.1}s after it; {} images re-driven, {} duplicate outcomes absorbed",
        resumed.as_secs_f64(),
        cut.elapsed().as_secs_f64(),
        done.redriven,
        absorbed(&d)
    );
    d.stop_stages();
}
