//! Nothing lost, nothing doubled: a batch goes through the real binaries while
//! stage processes are killed, NATS restarts, PostgreSQL becomes unreachable
//! and every stage is stopped with SIGTERM once. Then every entry must have
//! exactly one outcome and the only dead letters must be the planted ones.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use facepipe_control::deadletters;
use facepipe_runtime::store::Store;
use facepipe_core::topology::StageName;
use rand::Rng;
use crate::support::{labelled_photos, photo_bytes, Deployment, PgProxy, PhotoZip};
use facepipe_core::domain::{BatchStatus, ImageStatus};

/// Copies of every labelled photo (164 each), plus planted bad entries.
const COPIES: usize = 4;
const PLANTED_BAD: [&str; 2] = ["bad/truncated.jpg", "bad/garbage.png"];

#[tokio::test(flavor = "multi_thread")]
async fn batch_survives_kills_restarts_and_outages() {
    let proxy = PgProxy::start().await;
    let proxied = |url: &facepipe_core::database_url::DatabaseUrl| proxy.url_for(url);
    let mut d = Deployment::start(|t| {
        t.postgres.url = proxied(&t.postgres.url);
        // Short timeouts so redeliveries happen within the test's time.
        for stage in [&mut t.stages.detect.ack_wait, &mut t.stages.crop.ack_wait, &mut t.stages.persist.ack_wait] {
            *stage = Duration::from_secs(4);
        }
        t.stages.extract.ack_wait = Duration::from_secs(3);
        t.stages.detect.concurrency = 1;
        t.stages.crop.concurrency = 1;
        t.stages.detect.shutdown_grace = Duration::from_secs(3);
    })
    .await;
    let (zip, image_count) = chaos_zip(d.dir.path());
    assert!(image_count >= 500);
    let started = Instant::now();
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "chaos"]).trim().to_string();

    // A bad message from outside, planted too.
    let client = async_nats::connect(&d.nats.url).await.unwrap();
    client.publish("faces.detect", "{\"batch_id\": 17}".into()).await.unwrap();
    client.flush().await.unwrap();

    let db = d.db.pool().await;
    let done = |s: &Option<facepipe_ledger::BatchSummary>| s.as_ref().is_some_and(|s| s.status == BatchStatus::Completed || s.status == BatchStatus::Failed);
    let mut rng = rand::rng();
    let (mut kills, mut nats_restarts, mut db_outages, mut sigterms) = (0, 0, 0, 0);
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(1000..2000));
    let mut faults: Vec<(Duration, &str)> =
        vec![(Duration::from_secs(3), "nats"), (Duration::from_secs(7), "db"), (Duration::from_secs(16), "sigterm")];
    faults.reverse();
    let timeout = Duration::from_secs(420);
    loop {
        let status = db.batch_status(&batch).await.ok().flatten();
        if done(&status) && faults.is_empty() {
            break;
        }
        assert!(started.elapsed() < timeout, "batch not done in {timeout:?}: {status:?}\n{}", d.logs());
        if let Some((at, fault)) = faults.last().copied() {
            if started.elapsed() >= at {
                assert!(!done(&status), "the batch finished before the `{fault}` fault: make it bigger");
                faults.pop();
                match fault {
                    "nats" => {
                        d.nats.restart();
                        nats_restarts += 1;
                    }
                    "db" => {
                        proxy.set_down(true);
                        tokio::time::sleep(Duration::from_millis(rng.random_range(5000..10000))).await;
                        proxy.set_down(false);
                        db_outages += 1;
                    }
                    _ => {
                        // Rolling restart: SIGTERM each process, it must exit 0, start it again.
                        // First let any process just restarted after a SIGKILL install its
                        // signal handler (a process killed in its first milliseconds dies by
                        // the signal, which is no graceful-shutdown failure).
                        d.restart_exited();
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        for i in 0..d.stages.len() {
                            d.signal(i, libc::SIGTERM);
                            let stage = d.stages[i].0;
                            let code = crate::support::wait_exit(&mut d.stages[i].1, Duration::from_secs(30))
                                .unwrap_or_else(|()| panic!("{stage:?} ignored SIGTERM\n{}", d.logs()));
                            assert_eq!(code, Some(0), "{:?} exit on SIGTERM\n{}", d.stages[i].0, d.logs());
                            sigterms += 1;
                            d.restart_exited();
                        }
                    }
                }
            }
        }
        if Instant::now() >= next_kill && !done(&status) {
            let i = rng.random_range(0..d.stages.len());
            d.signal(i, libc::SIGKILL);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(1000..2000));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        d.restart_exited();
    }
    let wall = started.elapsed();

    let status = db.batch_status(&batch).await.unwrap().unwrap();
    assert_eq!(status.status, BatchStatus::Completed, "{status:?}");
    assert_eq!(status.image_count, Some(image_count as i32));
    assert_eq!(status.processed, image_count as i32);
    assert_eq!(status.failed, PLANTED_BAD.len() as i32, "only the planted entries fail");

    // Every entry has exactly one terminal outcome.
    let results = db.results(&batch).await.unwrap();
    assert_eq!(results.len(), image_count);
    let entries: BTreeSet<&str> = results.iter().map(|r| r.entry.as_str()).collect();
    assert_eq!(entries.len(), image_count, "no entry twice");
    assert!(results.iter().all(|r| r.status != ImageStatus::Pending));
    let failed: BTreeSet<&str> = results.iter().filter(|r| r.status == ImageStatus::Failed).map(|r| r.entry.as_str()).collect();
    assert_eq!(failed, PLANTED_BAD.into_iter().collect());

    // One crop object per cropped image, none extra, none twice.
    let store = Store::open(&d.topology.object_store).unwrap();
    let crops = store.list(&format!("batches/{batch}/crops")).await.unwrap();
    let cropped: Vec<_> = results.iter().filter(|r| r.status == ImageStatus::Cropped).collect();
    assert_eq!(crops.len(), cropped.len());
    let recorded: BTreeSet<&str> = cropped.iter().flat_map(|r| r.crop_keys.iter().map(String::as_str)).collect();
    assert_eq!(recorded, crops.iter().map(String::as_str).collect::<BTreeSet<_>>());
    // Identical photos give identical outcomes, whatever happened to their messages.
    for copy in 1..COPIES {
        for r in results.iter().filter(|r| r.entry.starts_with("copy0/")) {
            let twin = results.iter().find(|t| t.entry == r.entry.replacen("copy0/", &format!("copy{copy}/"), 1)).unwrap();
            assert_eq!((&r.status, r.faces.len()), (&twin.status, twin.faces.len()), "{}", r.entry);
        }
    }

    // The only dead letters are the planted ones.
    let bus = facepipe_runtime::bus::Bus::connect(&d.topology.nats, "chaos-test", false).await.unwrap();
    let filter = deadletters::Filter { limit: 1000, ..Default::default() };
    let letters = deadletters::list(&bus, &d.topology, &filter).await.unwrap().letters;
    let mut planted_images: Vec<String> = results
        .iter()
        .filter(|r| r.status == ImageStatus::Failed)
        .map(|r| r.image_id.clone())
        .collect();
    planted_images.sort();
    let mut letter_images: Vec<String> = letters.iter().filter_map(|l| l.letter.image_id.clone()).collect();
    letter_images.sort();
    assert_eq!(letter_images, planted_images, "dead letters: {letters:#?}");
    assert_eq!(letters.len(), PLANTED_BAD.len() + 1, "plus the malformed message: {letters:#?}");

    let redeliveries = d.count_in_logs("redelivered message");
    let retries = d.count_in_logs("transient failure; retrying later");
    let paused = d.count_in_logs("pausing until it is back");
    eprintln!(
        "chaos: {image_count} images in {:.1}s; {kills} SIGKILLs, {nats_restarts} NATS restart, \
         {db_outages} PostgreSQL outage, {sigterms} SIGTERMs; {redeliveries} redeliveries, \
         {retries} Nak'd retries, {paused} pauses for an outage; {} dead letters (all planted)",
        wall.as_secs_f64(),
        letters.len()
    );
    assert!(kills >= 3 && nats_restarts == 1 && db_outages == 1 && sigterms == StageName::ALL.len());
    assert!(redeliveries > 0, "faults that cause no redelivery prove nothing");
}

/// Every labelled photo `COPIES` times, and the planted bad entries; its image count.
fn chaos_zip(dir: &std::path::Path) -> (std::path::PathBuf, usize) {
    let photos = labelled_photos();
    let mut truncated = photo_bytes(&photos[0]);
    truncated.truncate(200);
    PhotoZip::of(&photos)
        .copies(COPIES)
        .with(PLANTED_BAD[0], truncated)
        .with(PLANTED_BAD[1], *b"\x89PNG but nothing else")
        .write(&dir.join("chaos.zip"))
}
