//! The whole flow on an S3 object store: a real S3 server (s3s-fs, on a free
//! loopback port, requiring SigV4), the real stage binaries, `pipeline submit`
//! and `pipeline serve` pointed at it. Batches from the CLI and the HTTP API
//! land in the bucket, extract reads the uploaded ZIP by ranged GETs, crops are
//! served from the bucket, and a batch survives the server being killed and
//! restarted mid-batch with nothing lost and nothing doubled.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use facepipe_control::deadletters;
use facepipe_core::topology::{StageName, Topology};
use facepipe_runtime::store::RANGE_BYTES;
use serde_json::Value;
use crate::support::{free_port, labelled_photos, repo_root, wait_for_port, Deployment, PhotoZip, S3Server};
use facepipe_core::domain::{BatchStatus, ImageStatus};

const BATCH_TIMEOUT: Duration = Duration::from_secs(300);

/// `KEY: value` lines of the block under the first line of `text` that reads
/// `header` (trimmed), up to the next line indented no deeper than the header.
fn yaml_block(text: &str, header: &str) -> BTreeMap<String, String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != header);
    let head = lines.next().unwrap_or_else(|| panic!("compose.yaml has no `{header}`"));
    let indent = head.len() - head.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| !k.starts_with('#') && !k.starts_with('<'))
        .map(|(k, v)| (k.to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The object-store settings compose.yaml gives every stage, `apply` and the API:
/// the `PIPELINE_OBJECT_STORE_*` and `AWS_*` variables of its `x-stage` environment.
fn compose_store_env() -> BTreeMap<String, String> {
    let compose = std::fs::read_to_string(repo_root().join("compose.yaml")).unwrap();
    yaml_block(&compose, "environment: &stage-env")
        .into_iter()
        .filter(|(k, _)| k.starts_with("PIPELINE_OBJECT_STORE_") || k.starts_with("AWS_"))
        .collect()
}

/// The bucket of an `s3://bucket/prefix` URL.
fn bucket_of(url: &str) -> &str {
    url.strip_prefix("s3://").unwrap().split('/').next().unwrap()
}

/// compose.yaml's MinIO, its bucket and the stages agree on the settings, and they are
/// the ones the tests below run with: the same keys, bucket, region and `allow_http`.
#[test]
fn compose_describes_the_store_the_tests_use() {
    let compose = std::fs::read_to_string(repo_root().join("compose.yaml")).unwrap();
    let env = compose_store_env();
    let want: BTreeMap<String, String> = [
        ("PIPELINE_OBJECT_STORE_URL", "s3://facepipe"),
        ("PIPELINE_OBJECT_STORE_ENDPOINT", "http://minio:9000"),
        ("PIPELINE_OBJECT_STORE_REGION", crate::support::S3_REGION),
        ("PIPELINE_OBJECT_STORE_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", crate::support::S3_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", crate::support::S3_SECRET_KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, want, "compose.yaml's object-store settings");
    // MinIO's root user is the stages' key, and the bucket service makes the URL's bucket.
    let minio = yaml_block(&compose[compose.find("\n  minio:").unwrap()..], "environment:");
    assert_eq!(minio["MINIO_ROOT_USER"], env["AWS_ACCESS_KEY_ID"]);
    assert_eq!(minio["MINIO_ROOT_PASSWORD"], env["AWS_SECRET_ACCESS_KEY"]);
    let bucket = bucket_of(&env["PIPELINE_OBJECT_STORE_URL"]);
    let alias = format!("mc alias set local {} {} {}", env["PIPELINE_OBJECT_STORE_ENDPOINT"], minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]);
    assert!(compose.contains(&alias), "the bucket service logs in as the stages do: {alias}");
    assert!(compose.contains(&format!("mc mb --ignore-existing local/{bucket}")));
    // No setting left to the old AWS_* spelling, which the typed configuration replaces.
    for old in ["AWS_ENDPOINT", "AWS_REGION", "AWS_ALLOW_HTTP"] {
        assert!(!compose.contains(old), "compose.yaml still sets {old}");
    }

    // The repository's topology with compose's environment is a valid S3 deployment.
    let mut t = Topology::parse(&std::fs::read_to_string(repo_root().join("topology.toml")).unwrap()).unwrap();
    t.apply_env(|k| env.get(k).cloned()).unwrap();
    t.validate().unwrap();
    assert_eq!(t.object_store.url, "s3://facepipe");
    assert_eq!(t.object_store.endpoint.as_deref(), Some("http://minio:9000"));
    assert_eq!((t.object_store.region.as_deref(), t.object_store.allow_http), (Some(crate::support::S3_REGION), Some(true)));

    if std::process::Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success()) {
        let out = std::process::Command::new("docker-compose")
            .args(["-f", "compose.yaml", "config", "-q"])
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker-compose config: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A `pipeline serve` process, stopped (by its PID) on drop.
struct ApiServer {
    child: Child,
    base: String,
    client: reqwest::Client,
}

impl ApiServer {
    fn start(d: &Deployment) -> Self {
        let port = free_port();
        let log = std::fs::File::create(d.dir.path().join(format!("api-{port}.log.txt"))).unwrap();
        let mut command = d.command("pipeline");
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).env_remove("PIPELINE_API_TOKEN");
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        wait_for_port(port, Duration::from_secs(30));
        Self { child, base: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() }
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks a finished batch against the bucket: one outcome per image, its
/// originals and its crops in the bucket (on the server's disk), one crop object
/// per recorded crop key and no other. Returns the results.
async fn check_batch_in_bucket(
    d: &Deployment,
    s3: &S3Server,
    bucket: &str,
    prefix: &str,
    batch: &str,
    image_count: usize,
) -> Vec<facepipe_ledger::ImageResult> {
    let status = d.wait_for_batch(batch, BATCH_TIMEOUT).await;
    assert_eq!(status.status, BatchStatus::Completed, "{status:?}\n{}", d.logs());
    assert_eq!(status.image_count, Some(image_count as i32));
    assert_eq!(status.processed, image_count as i32);
    assert_eq!(status.failed, 1, "only the planted broken image fails: {status:?}");

    let results = d.db().await.results(batch).await.unwrap();
    assert_eq!(results.len(), image_count, "one outcome per image");
    let entries: BTreeSet<&str> = results.iter().map(|r| r.entry.as_str()).collect();
    assert_eq!(entries.len(), image_count, "no entry twice");
    assert!(results.iter().all(|r| ["cropped", "no_face", "failed"].contains(&r.status.as_str())));

    let under = |rest: &str| format!("{prefix}batches/{batch}/{rest}");
    let originals = s3.keys(bucket, &under("originals"));
    assert_eq!(originals.len(), image_count, "every original is in the bucket");
    let crops: BTreeSet<String> = s3.keys(bucket, &under("crops")).into_iter().collect();
    let recorded: BTreeSet<String> =
        results.iter().flat_map(|r| r.crop_keys.iter().map(|k| format!("{prefix}{k}"))).collect();
    let cropped = results.iter().filter(|r| r.status == ImageStatus::Cropped).count();
    assert!(cropped * 2 > image_count, "most photos hold a face: {cropped} of {image_count}");
    assert_eq!(recorded.len(), cropped, "one crop per cropped image (policy `largest`)");
    assert_eq!(crops, recorded, "the bucket holds exactly the recorded crops");
    for key in crops.iter().take(5) {
        let jpeg = std::fs::read(s3.object_path(bucket, key)).unwrap();
        assert_eq!(imagesize::blob_size(&jpeg).map(|s| (s.width, s.height)).unwrap(), (300, 300), "{key}");
    }
    results
}

/// `pipeline submit` and `POST /api/batch/upload-zip` against an S3 server,
/// every process configured exactly as compose.yaml configures its stages and
/// API (only the endpoint's host differs): originals, uploads and crops land in
/// the bucket, extract reads the ZIP through ranged GETs, and the API serves
/// the crops from the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn cli_and_api_batches_on_s3_with_the_compose_settings() {
    let s3 = S3Server::start();
    let mut env = compose_store_env();
    let bucket = bucket_of(&env["PIPELINE_OBJECT_STORE_URL"]).to_string();
    s3.create_bucket(&bucket);
    env.insert("PIPELINE_OBJECT_STORE_ENDPOINT".into(), s3.endpoint.clone());
    let mut d = Deployment::start_with(|_| {}, Vec::new(), env.into_iter().collect(), true).await;

    // The CLI: every labelled photo (16 MB, two ranged GETs' worth).
    let (zip, image_count) = planted_zip(d.dir.path(), "cli.zip", 1, usize::MAX);
    let zip_bytes = std::fs::metadata(&zip).unwrap().len();
    assert!(zip_bytes > RANGE_BYTES, "{zip_bytes}");
    let started = Instant::now();
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "s3-cli"]).trim().to_string();
    check_batch_in_bucket(&d, &s3, &bucket, "", &batch, image_count).await;
    let cli_secs = started.elapsed().as_secs_f64();
    let upload = s3.object_path(&bucket, &format!("uploads/{batch}.zip"));
    assert_eq!(std::fs::metadata(&upload).unwrap().len(), zip_bytes, "the ZIP was uploaded whole to the bucket");
    assert!(!d.dir.path().join("objects/batches").exists(), "nothing went to the topology file's local store");

    // Extract read the archive where it is, a window at a time: about its size in
    // bytes, in a few ranged GETs, never a whole download.
    let extract = |name: &str, labels: &[&str]| {
        let mut all = vec!["stage=\"extract\""];
        all.extend_from_slice(labels);
        d.counter(name, &all)
    };
    let read = extract("facepipe_object_read_bytes_total", &[]);
    let gets = extract("facepipe_step_seconds_count", &["step=\"fetch\""]);
    let min_gets = zip_bytes.div_ceil(RANGE_BYTES) as f64;
    assert!(read >= zip_bytes as f64 && read <= (zip_bytes + 2 * RANGE_BYTES) as f64, "extract read {read} bytes of a {zip_bytes} byte ZIP");
    assert!(gets >= min_gets && gets <= min_gets + 3.0, "{gets} ranged GETs for {zip_bytes} bytes");
    eprintln!("s3: CLI batch of {image_count} images in {cli_secs:.1}s; extract read {read} bytes of a {zip_bytes} byte ZIP in {gets} ranged GETs");

    // The HTTP API: upload, follow, read the results, download every crop from the bucket.
    let api = ApiServer::start(&d);
    let (zip, image_count) = planted_zip(d.dir.path(), "api.zip", 1, 20);
    let form = reqwest::multipart::Form::new()
        .text("projectId", "s3-api")
        .part("file", reqwest::multipart::Part::bytes(std::fs::read(&zip).unwrap()).file_name("photos.zip"));
    let (code, started) = api.json(api.client.post(format!("{}/api/batch/upload-zip", api.base)).multipart(form)).await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["imageCount"], image_count);
    let batch = started["batchId"].as_str().unwrap().to_string();
    check_batch_in_bucket(&d, &s3, &bucket, "", &batch, image_count).await;
    assert!(s3.object_path(&bucket, &format!("uploads/{batch}.zip")).is_file());
    let (code, page) = api.json(api.get(&format!("/api/batch/{batch}/results?pageSize=100"))).await;
    assert_eq!(code, 200, "{page}");
    let results = page["results"].as_array().unwrap();
    assert_eq!(results.len(), image_count);
    let mut served = 0;
    for crop in results.iter().flat_map(|r| r["crops"].as_array().unwrap()) {
        let response = api.get(crop["url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(response.status(), 200, "{crop}");
        assert_eq!(response.headers()["content-type"], "image/jpeg");
        let body = response.bytes().await.unwrap();
        let stored = std::fs::read(s3.object_path(&bucket, crop["key"].as_str().unwrap())).unwrap();
        assert!(body == stored, "the API serves the bucket's object: {crop}");
        served += 1;
    }
    assert!(served * 2 > image_count, "{served} crops served");
    let (code, _) = api.json(api.get(&format!("/api/batch/{batch}/crops/9999999-0.jpg"))).await;
    assert_eq!(code, 404, "a crop not in the bucket");

    for (stage, code) in d.stop_stages() {
        assert_eq!(code, Some(0), "{stage} did not exit cleanly\n{}", d.logs());
    }
}

/// The S3 server is killed (SIGKILL, by its PID) mid-batch and started again on
/// the same port 5-10 s later, while detect and crop work on one batch and
/// extract reads the next one's ZIP by ranged GETs. The stages wait (object_store
/// retries each request in place; `/readyz` says 503 meanwhile) and carry on:
/// both batches complete, every image has one outcome, no crop is written twice
/// or left over, and the only dead letters are the planted broken images.
#[tokio::test(flavor = "multi_thread")]
async fn batches_survive_the_s3_server_stopping_mid_batch() {
    const PREFIX: &str = "outage/";
    let mut s3 = S3Server::start();
    s3.create_bucket("facepipe");
    let endpoint_topology = {
        let s3 = &s3;
        move |t: &mut Topology| {
            s3.configure(t, "facepipe", PREFIX.trim_end_matches('/'));
            t.stages.detect.concurrency = 1;
            // Entries stored one or two at a time, so the second ZIP is still being read when the server dies.
            t.stages.extract.params.parallelism = 2;
        }
    };
    let d = Deployment::start_with(endpoint_topology, Vec::new(), s3.key_env(), true).await;
    let (zip, first_count) = planted_zip(d.dir.path(), "first.zip", 2, usize::MAX);
    let first = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "s3-outage"]).trim().to_string();
    let (zip, second_count) = planted_zip(d.dir.path(), "second.zip", 1, usize::MAX);
    let total = (first_count + second_count) as i32;

    let db = d.db().await;
    let processed = |batch: String| {
        let db = db.clone();
        async move { db.batch_status(&batch).await.unwrap().map_or(0, |s| s.processed) }
    };
    let start = Instant::now();
    while processed(first.clone()).await < first_count as i32 / 5 {
        assert!(start.elapsed() < BATCH_TIMEOUT, "no progress before the outage\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "s3-outage"]).trim().to_string();
    let both = || async { processed(first.clone()).await + processed(second.clone()).await };
    // Once extract has started on the second ZIP.
    while db.batch_status(&second).await.unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outage = Duration::from_millis(rand::random_range(5000..10000));
    let pid = s3.pid().unwrap();
    let before = both().await;
    s3.kill();
    let down_at = Instant::now();
    let second_then = db.batch_status(&second).await.unwrap().unwrap();
    // Meanwhile the stages that need the store say they are not ready.
    let mut unready = BTreeSet::new();
    while down_at.elapsed() < outage {
        for stage in [StageName::Extract, StageName::Detect, StageName::Crop] {
            if crate::support::http_get(d.metrics_port(stage), "/readyz").0 == 503 {
                unready.insert(stage);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = both().await;
    assert!(during < total, "the batches finished during the outage: make them bigger");
    s3.start_again();
    let up_at = Instant::now();
    let resumed = loop {
        if both().await > during {
            break up_at.elapsed();
        }
        assert!(up_at.elapsed() < Duration::from_secs(120), "no progress after the S3 server came back\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let mut results = check_batch_in_bucket(&d, &s3, "facepipe", PREFIX, &first, first_count).await;
    results.extend(check_batch_in_bucket(&d, &s3, "facepipe", PREFIX, &second, second_count).await);
    assert_eq!(
        unready,
        [StageName::Extract, StageName::Detect, StageName::Crop].into_iter().collect(),
        "every stage using the store reported not ready during the outage"
    );
    for stage in [StageName::Extract, StageName::Detect, StageName::Crop, StageName::Persist] {
        assert_eq!(crate::support::http_get(d.metrics_port(stage), "/readyz").0, 200, "{stage} ready again");
    }
    // The only dead letters are the planted broken images: the outage cost no image.
    let bus = facepipe_runtime::bus::Bus::connect(&d.topology.nats, "s3-test", false).await.unwrap();
    let filter = deadletters::Filter { limit: 100, ..Default::default() };
    let letters = deadletters::list(&bus, &d.topology, &filter).await.unwrap().letters;
    let failed: Vec<&str> = results.iter().filter(|r| r.status == ImageStatus::Failed).map(|r| r.entry.as_str()).collect();
    assert_eq!(failed, ["broken/truncated.jpg", "broken/truncated.jpg"]);
    assert_eq!(letters.len(), 2, "dead letters: {letters:#?}");
    // Identical photos got identical outcomes, whether or not the outage hit them: the
    // two copies in a batch, and the two batches.
    let outcomes = |batch: &[facepipe_ledger::ImageResult]| -> BTreeMap<String, (&'static str, usize)> {
        batch.iter().map(|r| (r.entry.clone(), (r.status.as_str(), r.faces.len()))).collect()
    };
    let (a, b) = (outcomes(&results[..first_count]), outcomes(&results[first_count..]));
    for (entry, outcome) in &b {
        assert_eq!(&a[entry], outcome, "{entry}, the same photo in both batches");
    }
    for (entry, outcome) in &a {
        if let Some(rest) = entry.strip_prefix("copy1/") {
            assert_eq!(&a[&format!("copy0/{rest}")], outcome, "{entry}");
        }
    }
    let redeliveries = d.counter("facepipe_redeliveries_total", &[]);
    let retried = d.counter("facepipe_messages_total", &["outcome=\"retried\""]);
    let skipped = d.counter("facepipe_messages_total", &["outcome=\"skipped\""]);
    eprintln!(
        "s3 outage: {total} images in two batches; s3s-fs (pid {pid}) killed at {before} processed \
         (second batch {} with {:?} images known), down {:.1}s ({during} processed meanwhile); \
         progress resumed {:.2}s after it was back; {redeliveries} redeliveries, {retried} Nak'd retries, \
         {skipped} outcomes already recorded; not ready meanwhile: {unready:?}; {:.1}s in all",
        second_then.status.as_str(),
        second_then.image_count,
        outage.as_secs_f64(),
        resumed.as_secs_f64(),
        start.elapsed().as_secs_f64(),
    );
}

/// `limit` labelled photos `copies` times, a truncated JPEG and a text file; its image count.
fn planted_zip(dir: &std::path::Path, name: &str, copies: usize, limit: usize) -> (std::path::PathBuf, usize) {
    PhotoZip::of(labelled_photos().iter().take(limit))
        .copies(copies)
        .with("broken/truncated.jpg", *b"\xff\xd8\xff\xe0 not really a jpeg")
        .with("notes/README.txt", *b"not an image")
        .write(&dir.join(name))
}
