//! A full disk fails no image: the object store's filesystem (a small tmpfs the test
//! mounts) filling mid-batch, and JetStream's store reaching `max_file_store`. A stage
//! that cannot write waits in place with the message it holds, stops pulling, and says
//! why on `/readyz` and in its log; once space returns it goes on, and the batch
//! completes as if nothing happened.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use facepipe_core::domain::StageName;

use crate::broker_loss::{heal_quickly, photo_batch};
use crate::support::{http_get, Deployment, NatsServer};

/// A tmpfs of the test's own, unmounted on drop (also when the test fails).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Self {
        assert_eq!(unsafe { libc::geteuid() }, 0, "mounting a tmpfs needs root");
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"]).arg(path).status().unwrap();
        assert!(status.success(), "mount a tmpfs at {}", path.display());
        Self { path: path.to_path_buf() }
    }

    /// Makes room: the same filesystem, `bytes` large.
    fn resize(&self, bytes: u64) {
        let status = Command::new("mount").args(["-o", &format!("remount,size={bytes}")]).arg(&self.path).status().unwrap();
        assert!(status.success(), "remount {}", self.path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Waits until some stage process's `/readyz` says it waits for space; returns which.
async fn wait_for_space_report(d: &Deployment) -> StageName {
    let start = Instant::now();
    loop {
        for (stage, port) in &d.metrics_ports {
            // A stage just started may not listen yet.
            if std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                continue;
            }
            let (code, body) = http_get(*port, "/readyz");
            if code == 503 && body.contains("waiting for space") {
                return *stage;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no stage said it waits for space\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The object store is a tmpfs with room for the upload and a few megabytes more: it
/// fills while extract stores the originals. Nothing fails; the batch completes once
/// the tmpfs is made larger.
#[tokio::test(flavor = "multi_thread")]
async fn object_store_filling_up_fails_no_image_and_the_batch_resumes_when_space_returns() {
    let mut d = Deployment::start_stages(heal_quickly, Vec::new(), Vec::new(), true, &[]).await;
    let (zip, entries) = photo_batch(&d, 1);
    let upload = std::fs::metadata(&zip).unwrap().len();
    let store = Tmpfs::mount(&d.dir.path().join("objects"), upload + 6 * 1024 * 1024);
    for stage in StageName::ALL {
        d.start_stage_with_metrics(stage);
    }
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "full"]).trim().to_string();
    let waiting = wait_for_space_report(&d).await;
    let full = Instant::now();
    // Well past ack_wait: the messages held are kept, not redelivered nor failed.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = d.db().await.batch_status(&batch).await.unwrap().unwrap();
    assert_eq!(status.failed, 0, "no image fails for want of space: {status:?}");
    assert!(status.processed < entries as i32, "the store filled mid-batch: {status:?}");
    assert!(d.count_in_logs("no space to write; waiting for space") > 0, "{}", d.logs());
    let full = full.elapsed();
    store.resize(512 * 1024 * 1024);
    let room = Instant::now();
    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    let room = room.elapsed();
    d.check_every_entry_once(&batch, entries, 0).await;
    for (stage, port) in &d.metrics_ports {
        let (code, body) = http_get(*port, "/readyz");
        assert_eq!(code, 200, "{stage} ready again: {body}");
    }
    eprintln!(
        "disk full: object store full at {} of {entries} images processed ({waiting} said so first); space returned after {:.1}s; \
         completed {:.1}s later with {} failures",
        status.processed,
        full.as_secs_f64(),
        room.as_secs_f64(),
        done.failed
    );
    d.stop_stages();
}

/// JetStream's store reaches `max_file_store` while extract publishes a batch's detect
/// jobs, with no stream limit set: extract backs off in place and says so, and so does
/// detect, which has no room for its output either (the store is one for all streams:
/// nothing can move until it grows). No image fails and nothing is registered twice;
/// once the operator gives the server room and restarts it, the batch completes.
#[tokio::test(flavor = "multi_thread")]
async fn jetstream_store_at_max_file_store_makes_extract_back_off_and_register_nothing_twice() {
    let nats = NatsServer::start_with_config("jetstream { max_file_store: 16KB }");
    let mut d = Deployment::start_on_server(nats, heal_quickly, &[]).await;
    for stage in StageName::ALL {
        d.start_stage_with_metrics(stage);
    }
    let (zip, entries) = photo_batch(&d, 1);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "full"]).trim().to_string();
    wait_for_space_report(&d).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let client = d.db.client().await;
    let registered: i64 = client.query_one("SELECT count(*) FROM images WHERE batch_id = $1", &[&batch]).await.unwrap().get(0);
    assert!((registered as usize) < entries, "the store filled part way through ingest: {registered} of {entries}");
    let status = d.db().await.batch_status(&batch).await.unwrap().unwrap();
    assert_eq!(status.failed, 0, "{status:?}");
    let backoffs = d.count_in_logs("no space to write; waiting for space");
    assert!(backoffs >= 2, "extract backs off and tries again: {backoffs}\n{}", d.logs());
    let (code, body) = http_get(d.metrics_port(StageName::Extract), "/readyz");
    assert!(code == 503 && body.contains("insufficient resources"), "{code} {body}");

    // The operator gives JetStream room.
    d.nats.set_config("jetstream { max_file_store: 64MB }");
    d.nats.terminate();
    d.nats.start_again();
    let room = Instant::now();
    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    d.check_every_entry_once(&batch, entries, 0).await;
    let rows: i64 = client.query_one("SELECT count(*) FROM images WHERE batch_id = $1", &[&batch]).await.unwrap().get(0);
    assert_eq!(rows as usize, entries, "no entry registered twice");
    eprintln!(
        "disk full: JetStream at max_file_store after {registered} of {entries} entries registered; {backoffs} back-offs, no failure; \
         with room again, completed in {:.1}s; {} re-driven",
        room.elapsed().as_secs_f64(),
        done.redriven
    );
    d.stop_stages();
}

/// With `nats.stream_max_bytes`, the store cannot fill: each stage's stream has its
/// reserved share, so when the detect stream is at its limit extract waits while detect
/// goes on into the crop stream's room, and the batch completes with nobody's help.
#[tokio::test(flavor = "multi_thread")]
async fn with_stream_limits_a_full_stream_only_slows_extract_down() {
    let nats = NatsServer::start_with_config("jetstream { max_file_store: 512KB }");
    let mut d = Deployment::start_on_server(
        nats,
        |t| {
            heal_quickly(t);
            t.nats.stream_max_bytes = Some(bytesize::ByteSize::kib(64));
            let s = &mut t.stages;
            for max in [&mut s.extract.max_message_bytes, &mut s.detect.max_message_bytes, &mut s.crop.max_message_bytes, &mut s.persist.max_message_bytes] {
                *max = 64 * 1024;
            }
            t.stages.detect.concurrency = 1;
        },
        &[],
    )
    .await;
    for stage in StageName::ALL {
        d.start_stage_with_metrics(stage);
    }
    // More detect jobs than the detect stream's 64 KiB hold.
    let (zip, entries) = photo_batch(&d, 2);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "full"]).trim().to_string();
    assert_eq!(wait_for_space_report(&d).await, StageName::Extract);
    let done = d.wait_for_batch(&batch, Duration::from_secs(240)).await;
    d.check_every_entry_once(&batch, entries, 0).await;
    let backoffs = d.count_in_logs("no space to write; waiting for space");
    assert!(d.count_in_logs("maximum bytes exceeded") > 0, "the detect stream's own limit: {}", d.logs());
    eprintln!(
        "disk full: with stream_max_bytes 64 KiB, extract waited {backoffs} times for the detect stream; {} images, {} failed",
        done.processed, done.failed
    );
    d.stop_stages();
}
