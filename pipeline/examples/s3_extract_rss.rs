//! A measurement, not a test: extract's peak memory while it ingests a large ZIP
//! from an S3 server, reading it by ranged GETs.
//!
//! ```sh
//! cargo build --release -p extract -p pipeline
//! cargo run --release -p pipeline --example s3_extract_rss -- 1024   # ZIP size in MiB (default 1024)
//! ```
//!
//! It starts what the integration tests start (a nats-server, a fresh PostgreSQL
//! database, an s3s-fs server on a free loopback port, see `tests/it/support`),
//! writes a ZIP of the labelled photos repeated up to the size asked (entries
//! stored, not deflated: JPEGs do not shrink), uploads it with `pipeline submit`,
//! runs the release `extract` binary alone (its detect jobs are left queued) and
//! prints extract's peak RSS (`VmHWM`) once the archive is ingested, with the bytes
//! and ranged GETs it took.

#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code, unused_imports)] // the example uses a part of the tests' harness
mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use facepipe_core::topology::StageName;
use support::{labelled_photos, shared_dir, Deployment, S3Server};
use facepipe_core::domain::BatchStatus;

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::args().nth(1).map(|a| a.parse().expect("the ZIP's size in MiB")).unwrap_or(1024);
    let mut s3 = S3Server::start();
    s3.create_bucket("facepipe");
    let edit = |t: &mut facepipe_core::topology::Topology| s3.configure(t, "facepipe", "rss");
    let d = Deployment::start_stages(edit, Vec::new(), s3.key_env(), true, &[StageName::Extract]).await;

    // The labelled photos, over and over, until the archive has the size asked.
    let faces = shared_dir().join("data/faces");
    let photos: Vec<(String, Vec<u8>)> =
        labelled_photos().iter().map(|p| (p.file.clone(), std::fs::read(faces.join(&p.file)).unwrap())).collect();
    let zip_path = d.dir.path().join("large.zip");
    let target = mib << 20;
    let (mut written, mut entries) = (0u64, 0usize);
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(&zip_path).unwrap()));
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    'fill: for copy in 0.. {
        for (name, bytes) in &photos {
            if written + bytes.len() as u64 > target {
                break 'fill;
            }
            zip.start_file(format!("copy{copy:04}/{name}"), stored).unwrap();
            zip.write_all(bytes).unwrap();
            written += bytes.len() as u64;
            entries += 1;
        }
    }
    zip.finish().unwrap();
    let zip_bytes = std::fs::metadata(&zip_path).unwrap().len();
    eprintln!("ZIP: {entries} photos, {:.1} MiB", zip_bytes as f64 / (1 << 20) as f64);

    let started = Instant::now();
    let batch = d.cli_ok(&["submit", zip_path.to_str().unwrap(), "--project", "rss"]).trim().to_string();
    let uploaded = started.elapsed();
    let db = d.db().await;
    let ingested = loop {
        let status = db.batch_status(&batch).await.unwrap();
        match status {
            Some(s) if s.image_count.is_some() => break s,
            Some(s) if s.status == BatchStatus::Failed => panic!("batch failed: {s:?}\n{}", d.logs()),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "not ingested in 30 minutes\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ingest = started.elapsed() - uploaded;
    let extract_pid = d.stages[0].1.id();
    let peak_mib = pipeline::processes::Usage::of(extract_pid, false).peak_rss_mib;
    let read = d.counter(facepipe_core::telemetry::OBJECT_READ_BYTES, &[]);
    let gets = d.counter(&format!("{}_count", facepipe_core::telemetry::STEP_SECONDS), &["step=\"fetch\""]);
    let originals = s3.keys("facepipe", &format!("rss/batches/{batch}/originals")).len();
    assert_eq!(ingested.image_count, Some(entries as i32), "{ingested:?}");
    assert_eq!(originals, entries, "every photo stored as an original in the bucket");
    println!(
        "extract ingested a {:.1} MiB ZIP ({entries} photos) from s3s-fs in {:.1}s (upload {:.1}s): \
         peak RSS {:.1} MiB; read {:.1} MiB of it in {gets} ranged GETs",
        zip_bytes as f64 / (1 << 20) as f64,
        ingest.as_secs_f64(),
        uploaded.as_secs_f64(),
        peak_mib,
        read / (1 << 20) as f64,
    );
    drop(d);
    s3.kill();
}
