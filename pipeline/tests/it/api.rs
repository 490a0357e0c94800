//! The HTTP API (`pipeline serve`) through a real HTTP client, against a real
//! deployment (nats-server, PostgreSQL, the stage binaries) and, for
//! `add-images`, a real HTTP server serving images on 127.0.0.1.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use crate::support::{labelled_photos, write_zip, ApiServer, Deployment, PhotoZip};

const TOKEN: &str = "test-token-3f9a";
const BATCH_TIMEOUT: Duration = Duration::from_secs(180);

impl ApiServer {
    fn start(d: &Deployment) -> Self {
        Self::start_with_token(d, Some(TOKEN))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base)).bearer_auth(TOKEN)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.base)).bearer_auth(TOKEN)
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
    }

    /// Polls the status endpoint until the batch completes or fails.
    async fn wait_for_batch(&self, batch_id: &str) -> Value {
        let start = Instant::now();
        loop {
            let (code, body) = self.json(self.get(&format!("/api/batch/status/{batch_id}"))).await;
            assert_eq!(code, 200, "{body}");
            if ["completed", "failed"].contains(&body["batch"]["status"].as_str().unwrap()) {
                return body;
            }
            assert!(start.elapsed() < BATCH_TIMEOUT, "batch did not finish: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Uploads `file` with curl; returns the status code and body.
    fn curl_upload(&self, file: &std::path::Path, extra: &[&str]) -> (u16, String) {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-H", &format!("Authorization: Bearer {TOKEN}")])
            .args(extra)
            .args(["-F", "projectId=api", "-F", &format!("file=@{}", file.display())])
            .arg(format!("{}/api/batch/upload-zip", self.base))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

}

fn photo_entries(n: usize) -> Vec<(String, Vec<u8>)> {
    PhotoZip::of(labelled_photos().iter().take(n)).entries().to_vec()
}

fn zip_form(bytes: Vec<u8>, project: &str) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .text("projectId", project.to_string())
        .text("priority", "7")
        .part("file", reqwest::multipart::Part::bytes(bytes).file_name("photos.zip"))
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_zip_then_status_results_crops_and_queue_stats() {
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_owned();
    let d = Deployment::start(move |t| {
        t.api.max_upload_bytes = 8 << 20;
        t.api.upload_dir = Some(spool_dir);
    })
    .await;
    // An upload a crashed server was spooling: removed when the server starts again.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let orphan = spool.path().join(format!("facepipe-{}-upload-x", gone.id()));
    gone.wait().unwrap();
    std::fs::write(&orphan, b"partial upload").unwrap();
    let api = ApiServer::start(&d);
    assert!(!orphan.exists(), "the crashed server's spool file is swept at start-up");

    let mut entries = photo_entries(6);
    entries.push(("broken.jpg".into(), b"\xff\xd8\xff\xe0 truncated".to_vec()));
    entries.push(("notes.txt".into(), b"not an image".to_vec()));
    let zip_path = d.dir.path().join("photos.zip");
    write_zip(&zip_path, &entries);
    let (code, started) =
        api.json(api.post("/api/batch/upload-zip").multipart(zip_form(std::fs::read(&zip_path).unwrap(), "api"))).await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["success"], true);
    assert_eq!(started["imageCount"], 7, "six photos and the broken one; the text file is not an image");
    assert_eq!(started["queued"], 7);
    let batch = started["batchId"].as_str().unwrap().to_string();

    let done = api.wait_for_batch(&batch).await;
    let b = &done["batch"];
    assert_eq!(b["status"], "completed", "{done}");
    assert_eq!((&b["progress"]["processed"], &b["progress"]["total"], &b["progress"]["failed"]), (&json!(7), &json!(7), &json!(1)));
    assert_eq!(b["progressPercent"], 100.0);
    assert_eq!(b["projectId"], "api");
    assert_eq!(b["priority"], 7);
    // The old design's field names, which its clients read, beside the new ones.
    for (field, want) in [("batchId", json!(batch)), ("imageCount", json!(7)), ("queued", json!(0))] {
        assert_eq!(b[field], want, "batch.{field} of the old shape in {done}");
    }
    assert!(b["progress"]["updatedAt"].is_string(), "batch.progress.updatedAt of the old shape in {done}");

    // Paged results cover every image once, in order.
    let mut seen = Vec::new();
    for page in 1..=3 {
        let (code, body) = api.json(api.get(&format!("/api/batch/{batch}/results?page={page}&pageSize=3"))).await;
        assert_eq!(code, 200, "{body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), [3, 3, 1][page - 1]);
        seen.extend(results.iter().cloned());
    }
    let ids: Vec<&str> = seen.iter().map(|r| r["imageId"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted);
    // The same pages by key: each full page names where the next starts; the last names none.
    let (mut by_key, mut after) = (Vec::new(), String::new());
    loop {
        let (code, body) = api.json(api.get(&format!("/api/batch/{batch}/results?after={after}&pageSize=3"))).await;
        assert_eq!(code, 200, "{body}");
        by_key.extend(body["results"].as_array().unwrap().iter().map(|r| r["imageId"].as_str().unwrap().to_string()));
        match body["nextAfter"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }
    assert_eq!(by_key, ids);
    let broken = seen.iter().find(|r| r["entry"] == "broken.jpg").unwrap();
    assert_eq!(broken["status"], "failed");
    assert_eq!(broken["failedStage"], "detect");

    // Every crop listed is downloadable as a JPEG.
    let crops: Vec<&str> = seen.iter().flat_map(|r| r["crops"].as_array().unwrap()).map(|c| c["url"].as_str().unwrap()).collect();
    assert!(!crops.is_empty(), "the labelled photos hold faces");
    for url in &crops {
        let response = api.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/jpeg");
        assert!(response.bytes().await.unwrap().starts_with(b"\xff\xd8"));
    }
    let (code, _) = api.json(api.get(&format!("/api/batch/{batch}/crops/9999999-0.jpg"))).await;
    assert_eq!(code, 404);
    let (code, _) = api.json(api.get(&format!("/api/batch/{batch}/crops/..%2F..%2Fsecret.jpg"))).await;
    assert_eq!(code, 404, "names outside the batch's crops are not served");

    // Queue statistics under the old names and the stage names.
    let (code, stats) = api.json(api.get("/api/batch/queue-stats")).await;
    assert_eq!(code, 200, "{stats}");
    for name in ["batchIngestion", "faceDetection", "faceCrop", "resultPersist"] {
        for field in ["waiting", "active", "completed", "failed", "delayed", "replicas"] {
            assert!(stats["queues"][name][field].is_u64(), "{name}.{field} in {stats}");
        }
    }
    assert_eq!(stats["queues"]["faceDetection"], stats["stages"]["detect"]);
    // The old design's shape, as its monitoring recipes read it (`jq .stats.faceDetection.failed`).
    for name in ["batchIngestion", "faceDetection"] {
        for field in ["waiting", "active", "completed", "failed", "delayed"] {
            assert!(stats["stats"][name][field].is_u64(), "stats.{name}.{field} of the old shape in {stats}");
        }
    }
    assert!(stats["stats"]["faceDetection"]["failed"].as_u64().unwrap() >= 1);
    assert!(stats["stats"]["timestamp"].as_u64().is_some_and(|ms| ms > 1_600_000_000_000), "stats.timestamp in ms: {stats}");
    assert!(stats["stages"]["detect"]["completed"].as_u64().unwrap() >= 7);
    assert!(stats["stages"]["detect"]["failed"].as_u64().unwrap() >= 1);

    // Errors are JSON with a message.
    let (code, body) = api.json(api.get("/api/batch/status/no-such-batch")).await;
    assert_eq!((code, body["success"].clone()), (404, json!(false)));
    assert!(body["error"].as_str().unwrap().contains("no-such-batch"));
    let (code, body) = api.json(api.client.get(format!("{}/api/batch/status/{batch}", api.base))).await;
    assert_eq!(code, 401, "no token: {body}");
    let (code, _) = api.json(api.client.get(format!("{}/api/batch/status/{batch}", api.base)).bearer_auth("wrong")).await;
    assert_eq!(code, 401);
    let (code, body) = api.json(api.post("/api/batch/upload-zip").multipart(zip_form(b"not a zip".to_vec(), "api"))).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not a usable ZIP"), "{body}");
    let no_project = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(vec![1, 2, 3]));
    let (code, body) = api.json(api.post("/api/batch/upload-zip").multipart(no_project)).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("projectId"), "{body}");

    // Over the size cap: 413, and nothing is left in the spool directory. curl, because a
    // server refusing a body early closes the connection, which curl reports properly.
    let big = d.dir.path().join("big.zip");
    std::fs::write(&big, vec![7u8; 9 << 20]).unwrap();
    let (code, body) = api.curl_upload(&big, &[]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("max_upload_bytes"), "{body}");
    let (code, body) = api.curl_upload(&big, &["-H", "Transfer-Encoding: chunked"]);
    assert_eq!(code, 413, "a chunked upload without a length is cut off at the cap too: {body}");
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0, "spool files are removed");

    // The OpenAPI document is generated from the routes: every route is in it, and with a
    // token configured every /api operation requires the bearer scheme.
    let served: Value = api.client.get(format!("{}/openapi.json", api.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer", "{served}");
    for path in ["/api/batch/upload-zip", "/api/batch/add-images", "/api/batch/status/{batchId}", "/api/batch/queue-stats", "/api/batch/{batchId}/results", "/api/batch/{batchId}/crops/{name}"] {
        let operations = served["paths"][path].as_object().unwrap_or_else(|| panic!("{path} is documented"));
        for (method, operation) in operations {
            assert_eq!(operation["security"], json!([{ "bearer": [] }]), "{method} {path} requires the token");
        }
    }
    assert!(served["paths"]["/openapi.json"]["get"]["security"].is_null(), "the document itself is open");
}

/// Runs schemathesis against `api`'s own document; returns its output when it finds a failure.
fn schemathesis(api: &ApiServer, token: Option<&str>, report: &std::path::Path) -> Result<String, String> {
    let bin = crate::support::repo_root().join("target/tools/venv/bin/schemathesis");
    assert!(bin.exists(), "schemathesis is installed by `scripts/setup --test` at {}", bin.display());
    let mut command = std::process::Command::new(bin);
    command
        .arg("run")
        .arg(format!("{}/openapi.json", api.base))
        .args(["--checks", "all"])
        // Valid by the schema is not always usable: a ZIP's bytes, a URL's host. The server
        // rightly answers 400 there, which this check would count as a failure.
        .args(["--exclude-checks", "positive_data_acceptance"])
        // A running batch's event stream ends only when the batch does, and no stage runs
        // here: each generated request would wait out the client's timeout.
        // `batch_events_stream_progress_until_the_batch_completes` covers it.
        .args(["--exclude-operation-id", "batchEvents"])
        // One worker: Python 3.11's AST parser, which hypothesis uses from every worker
        // thread, is not thread-safe ("AST constructor recursion depth mismatch").
        .args(["--max-examples", "30", "--seed", "7", "--workers", "1", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing", "--generation-database", "none"])
        .arg("--report-junit-path")
        .arg(report)
        .env("SCHEMATHESIS_HOOKS", "")
        .stdin(Stdio::null());
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = command.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(text) }
}

/// The document describes what the server does: schemathesis generates requests from it
/// (valid and invalid) against the real server and its services, with the token on and off.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_holds_under_schemathesis() {
    let mut d = Deployment::start(|t| {
        // Many batches a minute, and many wrong tokens (schemathesis sends them on purpose):
        // the limiters' 429s are documented, but would hide the rest. Their own tests are in
        // api and hardening.
        t.api.uploads_per_minute = 0;
        t.api.auth_failures_per_minute = 0;
        t.api.max_upload_bytes = 1 << 20;
    })
    .await;
    // No stage runs: the generated batches stay queued, and no generated URL is ever fetched
    // (tests send traffic to 127.0.0.1 only).
    d.stop_stages();
    for token in [Some(TOKEN), None] {
        let api = ApiServer::start_with_token(&d, token);
        let report = d.dir.path().join(format!("schemathesis-{}.xml", token.is_some()));
        match schemathesis(&api, token, &report) {
            Ok(out) => assert!(out.contains("passed"), "schemathesis ran no test:\n{out}"),
            Err(out) => panic!("schemathesis found a failure (token {}):\n{out}\n{}", token.is_some(), d.logs()),
        }
    }
}

/// A small HTTP server with one route per way a download can go.
async fn image_server(photo: Vec<u8>) -> String {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let jpeg = ([(header::CONTENT_TYPE, "image/jpeg")], photo.clone());
    let app = axum::Router::new()
        .route("/photo.jpg", get({ let jpeg = jpeg.clone(); move || async move { jpeg } }))
        .route("/redirect", get(|| async { axum::response::Redirect::temporary("/photo.jpg") }))
        .route("/loop", get(|| async { axum::response::Redirect::temporary("/loop") }))
        .route("/missing.jpg", get(|| async { (StatusCode::NOT_FOUND, "no such image") }))
        .route("/slow.jpg", get({ let jpeg = jpeg.clone(); move || async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            jpeg
        } }))
        .route("/huge.jpg", get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], vec![0xffu8; 3 << 20]) }))
        .route("/page.html", get(|| async { ([(header::CONTENT_TYPE, "text/html")], "<html>hello</html>") }))
        .route("/fake.jpg", get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], "plain text, not a JPEG") }))
        .route("/flaky.jpg", get({ let jpeg = jpeg.clone(); move || {
            let calls = flaky_calls.clone();
            let jpeg = jpeg.clone();
            async move {
                // Fails once with a 503, then serves: a transient failure that a retry fixes.
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err((StatusCode::SERVICE_UNAVAILABLE, "busy"))
                } else {
                    Ok(jpeg)
                }
            }
        } }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

#[tokio::test(flavor = "multi_thread")]
async fn add_images_downloads_each_url_and_records_each_failure_with_its_record_id() {
    let d = Deployment::start(|t| {
        let p = &mut t.stages.extract.params;
        // The test's image server is on 127.0.0.1, which the default refuses.
        p.allow_private_addresses = true;
        p.download_timeout = Duration::from_secs(1);
        p.max_entry_bytes = 2 << 20;
        p.max_redirects = 3;
        t.api.uploads_per_minute = 2;
    })
    .await;
    let api = ApiServer::start(&d);
    let (name, photo) = photo_entries(1).remove(0);
    assert!(photo.len() < 2 << 20, "{name} fits under the cap");
    let host = image_server(photo).await;
    let cases = [
        ("ok", "/photo.jpg"),
        ("redirected", "/redirect"),
        ("flaky", "/flaky.jpg"),
        ("missing", "/missing.jpg"),
        ("slow", "/slow.jpg"),
        ("huge", "/huge.jpg"),
        ("html", "/page.html"),
        ("fake", "/fake.jpg"),
        ("loop", "/loop"),
    ];
    let mut images: Vec<Value> =
        cases.iter().map(|(record, path)| json!({"recordId": record, "imageUrl": format!("{host}{path}")})).collect();
    images.push(json!({"recordId": 42, "imageUrl": "http://127.0.0.1:1/refused.jpg"}));
    let (code, started) =
        api.json(api.post("/api/batch/add-images").json(&json!({"projectId": "urls", "priority": 3, "images": images}))).await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["imageCount"], 10);
    let batch = started["batchId"].as_str().unwrap().to_string();
    let done = api.wait_for_batch(&batch).await;
    assert_eq!(done["batch"]["status"], "completed", "{done}");
    assert_eq!(done["batch"]["progress"]["total"], 10);

    let (_, body) = api.json(api.get(&format!("/api/batch/{batch}/results?pageSize=100"))).await;
    let by_record = |record: &str| -> Value {
        body["results"].as_array().unwrap().iter().find(|r| r["recordId"] == record).cloned()
            .unwrap_or_else(|| panic!("no result for {record}: {body}"))
    };
    for ok in ["ok", "redirected", "flaky"] {
        let r = by_record(ok);
        assert!(["cropped", "no_face"].contains(&r["status"].as_str().unwrap()), "{ok}: {r}");
    }
    let expect_failure = |record: &str, needle: &str| {
        let r = by_record(record);
        assert_eq!(r["status"], "failed", "{record}: {r}");
        assert_eq!(r["failedStage"], "extract", "{record}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains(needle), "{record}: `{error}` should mention `{needle}`");
    };
    expect_failure("missing", "HTTP 404");
    expect_failure("slow", "timed out");
    expect_failure("huge", "larger than");
    expect_failure("html", "not an image (content type `text/html`)");
    expect_failure("fake", "not an image");
    expect_failure("loop", "redirect");
    expect_failure("42", "127.0.0.1:1");
    assert_eq!(done["batch"]["progress"]["failed"], 7);

    // Bad requests are refused with a reason, before any batch exists.
    let (code, body) = api.json(api.post("/api/batch/add-images").json(&json!({"projectId": "urls", "images": [{"imageUrl": "ftp://x/y.jpg"}]}))).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("images[0].imageUrl"), "{body}");
    let (code, body) = api.json(api.post("/api/batch/add-images").json(&json!({"projectId": "urls", "priority": 11, "images": [{"imageUrl": "http://x/y.jpg"}]}))).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("priority"), "{body}");
    let (code, _) = api.json(api.post("/api/batch/add-images").header("content-type", "application/json").body("{not json")).await;
    assert_eq!(code, 400);

    // Two batches a minute per client: the third is refused with Retry-After.
    let one = json!({"projectId": "urls", "images": [{"recordId": "again", "imageUrl": format!("{host}/photo.jpg")}]});
    let (code, _) = api.json(api.post("/api/batch/add-images").json(&one)).await;
    assert_eq!(code, 200);
    let response = api.post("/api/batch/add-images").json(&one).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn add_images_refuses_private_addresses_by_default_without_connecting() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let d = Deployment::start(|_| {}).await;
    let api = ApiServer::start(&d);
    // A server that would serve the photo to anyone who reached it, and counts who did.
    let (_, photo) = photo_entries(1).remove(0);
    let requests = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback({
        let requests = requests.clone();
        move || async move {
            requests.fetch_add(1, Ordering::SeqCst);
            ([(axum::http::header::CONTENT_TYPE, "image/jpeg")], photo)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let cases = [
        ("loopback", format!("http://127.0.0.1:{port}/photo.jpg"), "127.0.0.1"),
        // A name: the resolver finds only loopback addresses and refuses them.
        ("name", format!("http://localhost:{port}/photo.jpg"), "localhost"),
        ("decimal", format!("http://2130706433:{port}/photo.jpg"), "127.0.0.1"),
        ("metadata", "http://169.254.169.254/latest/meta-data/".to_string(), "169.254.169.254"),
        // Reserved ranges, and IPv6 forms that carry 127.0.0.1: refused before any connection.
        ("documentation", format!("http://192.0.2.1:{port}/photo.jpg"), "192.0.2.1"),
        ("nat64", format!("http://[64:ff9b::7f00:1]:{port}/photo.jpg"), "[64:ff9b::7f00:1]"),
        ("6to4", format!("http://[2002:7f00:1::1]:{port}/photo.jpg"), "[2002:7f00:1::1]"),
    ];
    let images: Vec<Value> = cases.iter().map(|(record, url, _)| json!({"recordId": record, "imageUrl": url})).collect();
    let (code, started) = api.json(api.post("/api/batch/add-images").json(&json!({"projectId": "ssrf", "images": images}))).await;
    assert_eq!(code, 200, "{started}");
    let batch = started["batchId"].as_str().unwrap().to_string();
    let done = api.wait_for_batch(&batch).await;
    assert_eq!(done["batch"]["progress"]["failed"], cases.len(), "{done}");
    let (_, body) = api.json(api.get(&format!("/api/batch/{batch}/results?pageSize=100"))).await;
    for (record, _, host) in &cases {
        let r = body["results"].as_array().unwrap().iter().find(|r| r["recordId"] == *record).unwrap();
        assert_eq!(r["failedStage"], "extract", "{r}");
        let error = r["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("{host} is not a public address")) && error.contains("allow_private_addresses"),
            "{record}: `{error}`"
        );
    }
    assert_eq!(requests.load(Ordering::SeqCst), 0, "no download reached the server");
}

/// Writes a ZIP of about `bytes` bytes: stored (uncompressed) blobs that are not
/// images, so extract skips them after the upload, plus one photo.
fn write_large_zip(path: &std::path::Path, bytes: u64) {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(path).unwrap()));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
    let blob: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let per_entry = 64u64 << 20;
    for i in 0..bytes.div_ceil(per_entry) {
        w.start_file(format!("blobs/{i:03}.bin"), stored).unwrap();
        for _ in 0..per_entry / blob.len() as u64 {
            w.write_all(&blob).unwrap();
        }
    }
    let (name, photo) = photo_entries(1).remove(0);
    w.start_file(name, stored).unwrap();
    w.write_all(&photo).unwrap();
    w.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_gigabyte_upload_streams_through_with_bounded_memory() {
    let d = Deployment::start(|_| {}).await;
    let api = ApiServer::start(&d);
    let zip = d.dir.path().join("large.zip");
    write_large_zip(&zip, 1 << 30);
    let size = std::fs::metadata(&zip).unwrap().len();
    assert!(size >= 1 << 30);

    let file = tokio::fs::File::open(&zip).await.unwrap();
    let body = reqwest::Body::from(file);
    let form = reqwest::multipart::Form::new()
        .text("projectId", "large")
        .part("file", reqwest::multipart::Part::stream_with_length(body, size).file_name("large.zip"));
    let started = Instant::now();
    let (code, body) = api.json(api.post("/api/batch/upload-zip").multipart(form)).await;
    let elapsed = started.elapsed();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["imageCount"], 1, "the blobs are not images");
    let peak = api.peak_rss();
    println!(
        "uploaded {} MiB in {:.1} s ({:.0} MiB/s); server peak RSS {} MiB",
        size >> 20,
        elapsed.as_secs_f64(),
        (size >> 20) as f64 / elapsed.as_secs_f64(),
        peak >> 20
    );
    // The upload is streamed to disk and to the store: memory does not grow with its size.
    assert!(peak < 128 << 20, "server peak RSS {} MiB for a {} MiB upload", peak >> 20, size >> 20);

    let done = api.wait_for_batch(body["batchId"].as_str().unwrap()).await;
    assert_eq!(done["batch"]["status"], "completed", "{done}");
    assert_eq!(done["batch"]["skipped"], 16);
}

/// The `status` events of a server-sent event stream, read until the server ends it.
async fn status_events(response: reqwest::Response) -> Vec<Value> {
    use futures::StreamExt;
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(BATCH_TIMEOUT, body.next()).await.expect("the stream ends by itself") {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        // Events end with a blank line; keep-alive comments start with ':'.
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let name = frame.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("message");
            let data: String = frame.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            if name == "status" {
                events.push(serde_json::from_str(&data).unwrap());
            } else {
                assert!(frame.lines().all(|l| l.starts_with(':')), "unexpected event: {frame}");
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_events_stream_progress_until_the_batch_completes() {
    let d = Deployment::start(|_| {}).await;
    let api = ApiServer::start(&d);
    let zip_path = d.dir.path().join("photos.zip");
    write_zip(&zip_path, &photo_entries(6));
    let (code, started) = api.json(api.post("/api/batch/upload-zip").multipart(zip_form(std::fs::read(&zip_path).unwrap(), "sse"))).await;
    assert_eq!(code, 200, "{started}");
    let batch = started["batchId"].as_str().unwrap().to_string();

    let response = api.get(&format!("/api/batch/{batch}/events")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = status_events(response).await;
    let processed: Vec<i64> = events.iter().map(|e| e["progress"]["processed"].as_i64().unwrap()).collect();
    assert!(processed.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {processed:?}");
    let last = events.last().unwrap();
    assert_eq!((last["batchId"].as_str(), last["status"].as_str()), (Some(batch.as_str()), Some("completed")), "{last}");
    assert_eq!(last["progress"]["processed"], 6);
    assert_eq!(events.iter().filter(|e| e["status"] == "completed").count(), 1, "it ends after the completing status");

    // A finished batch: one status, then the end.
    let again = status_events(api.get(&format!("/api/batch/{batch}/events")).send().await.unwrap()).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["status"], "completed");
    // Unknown batches and missing tokens are refused as everywhere else.
    assert_eq!(api.get("/api/batch/0123456789abcdef/events").send().await.unwrap().status().as_u16(), 404);
    // Nor ids that would not make a subject: a wildcard, a space.
    for id in ["%3E", "a%20b", "a.b"] {
        assert_eq!(api.get(&format!("/api/batch/{id}/events")).send().await.unwrap().status().as_u16(), 404, "{id}");
    }
    let anonymous = reqwest::get(format!("{}/api/batch/{batch}/events", api.base)).await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
}

/// Uploads `entries` as a ZIP for `project`; returns the batch id.
async fn upload(api: &ApiServer, dir: &std::path::Path, project: &str, entries: &[(String, Vec<u8>)]) -> String {
    let zip_path = dir.join(format!("{project}.zip"));
    write_zip(&zip_path, entries);
    let (code, started) = api.json(api.post("/api/batch/upload-zip").multipart(zip_form(std::fs::read(&zip_path).unwrap(), project))).await;
    assert_eq!(code, 200, "{started}");
    started["batchId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboards_reads_list_filter_group_export_and_replay() {
    let d = Deployment::start(|_| {}).await;
    let api = ApiServer::start(&d);
    let mut first_entries = photo_entries(3);
    first_entries.push(("bad/broken.jpg".into(), b"not a JPEG".to_vec()));
    let first = upload(&api, d.dir.path(), "project-a", &first_entries).await;
    api.wait_for_batch(&first).await;
    let second = upload(&api, d.dir.path(), "project-b", &photo_entries(2)).await;
    api.wait_for_batch(&second).await;

    // The batch list: newest first, filtered, paged by cursor, with the pace.
    let (code, all) = api.json(api.get("/api/batches")).await;
    assert_eq!(code, 200, "{all}");
    let ids: Vec<&str> = all["batches"].as_array().unwrap().iter().map(|b| b["batchId"].as_str().unwrap()).collect();
    assert_eq!(ids, [second.as_str(), first.as_str()], "newest first");
    let row = &all["batches"][1];
    assert_eq!((row["projectId"].as_str(), row["status"].as_str(), row["facesFound"].as_i64().is_some()), (Some("project-a"), Some("completed"), true));
    assert_eq!(row["progress"]["failed"], 1);
    assert!(row["imagesPerSecond"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["etaSeconds"].is_null(), "a finished batch has no ETA: {row}");
    let (_, a_only) = api.json(api.get("/api/batches?project=project-a")).await;
    assert_eq!(a_only["batches"].as_array().unwrap().len(), 1);
    assert_eq!(a_only["batches"][0]["batchId"], first.as_str());
    let (_, none) = api.json(api.get("/api/batches?status=failed")).await;
    assert!(none["batches"].as_array().unwrap().is_empty());
    let (_, page1) = api.json(api.get("/api/batches?limit=1")).await;
    assert_eq!(page1["batches"][0]["batchId"], second.as_str());
    let cursor = page1["nextBefore"].as_str().unwrap();
    let (_, page2) = api.json(api.get(&format!("/api/batches?limit=1&before={cursor}"))).await;
    assert_eq!(page2["batches"][0]["batchId"], first.as_str(), "the next page goes on from the cursor");
    for bad in ["status=done", "limit=0", "before=yesterday"] {
        let (code, body) = api.json(api.get(&format!("/api/batches?{bad}"))).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }

    // Results by status, failures grouped by reason and stage.
    let (_, failed) = api.json(api.get(&format!("/api/batch/{first}/results?status=failed"))).await;
    let failed = failed["results"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["entry"], "bad/broken.jpg");
    let (_, cropped) = api.json(api.get(&format!("/api/batch/{first}/results?status=cropped&pageSize=1"))).await;
    assert_eq!(cropped["results"][0]["status"], "cropped");
    let after = cropped["nextAfter"].as_str().unwrap();
    let (_, next) = api.json(api.get(&format!("/api/batch/{first}/results?status=cropped&pageSize=1&after={after}"))).await;
    assert!(next["results"][0]["imageId"].as_str().unwrap() > after);
    let (code, _) = api.json(api.get(&format!("/api/batch/{first}/results?status=cropped&page=2"))).await;
    assert_eq!(code, 400, "filtered pages go on by `after`");
    let (_, groups) = api.json(api.get(&format!("/api/batch/{first}/failures"))).await;
    assert_eq!(groups["groups"].as_array().unwrap().len(), 1, "{groups}");
    assert_eq!(groups["groups"][0]["stage"], "detect");
    assert_eq!(groups["groups"][0]["count"], 1);
    assert_eq!(groups["groups"][0]["example"], failed[0]["imageId"]);
    assert_eq!(groups["groups"][0]["reason"], failed[0]["error"]);

    // One image, and its original byte for byte.
    let image_id = cropped["results"][0]["imageId"].as_str().unwrap();
    let (code, image) = api.json(api.get(&format!("/api/batch/{first}/images/{image_id}"))).await;
    assert_eq!(code, 200, "{image}");
    assert_eq!(image["image"], cropped["results"][0]);
    let original = api.get(image["originalUrl"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(original.headers()["content-type"], "image/jpeg");
    let entry = image["image"]["entry"].as_str().unwrap();
    let uploaded = &first_entries.iter().find(|(name, _)| name == entry).unwrap().1;
    assert_eq!(&original.bytes().await.unwrap()[..], &uploaded[..]);
    let (code, _) = api.json(api.get(&format!("/api/batch/{first}/images/9999999"))).await;
    assert_eq!(code, 404);

    // Exports: every image, in both formats.
    let jsonl = api.get(&format!("/api/batch/{first}/export?format=jsonl")).send().await.unwrap();
    assert!(jsonl.headers()["content-disposition"].to_str().unwrap().contains(&format!("{first}.jsonl")));
    let lines: Vec<Value> = jsonl.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().any(|l| l["error"].is_string() && l["failedStage"] == "detect"));
    let csv = api.get(&format!("/api/batch/{first}/export?format=csv")).send().await.unwrap().text().await.unwrap();
    let mut rows = csv.lines();
    assert!(rows.next().unwrap().starts_with("\"imageId\",\"recordId\",\"entry\",\"status\""), "every cell quoted");
    assert_eq!(rows.count(), 4);
    let (code, _) = api.json(api.get(&format!("/api/batch/{first}/export?format=xml"))).await;
    assert_eq!(code, 400);

    // Queues: the replicas by pid, and throughput once two samples are apart.
    let (_, stats) = api.json(api.get("/api/stats")).await;
    let stages = stats["stages"].as_array().unwrap();
    assert_eq!(stages.iter().map(|s| s["stage"].as_str().unwrap()).collect::<Vec<_>>(), ["extract", "detect", "crop", "persist"]);
    let pids: Vec<u64> = stages.iter().flat_map(|s| s["replicas"].as_array().unwrap()).map(|r| r["pid"].as_u64().unwrap()).collect();
    for (_, child) in &d.stages {
        assert!(pids.contains(&(child.id() as u64)), "pid {} among {pids:?}", child.id());
    }
    assert_eq!(stages[1]["failed"], 1);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (_, stats) = api.json(api.get("/api/stats")).await;
    assert_eq!(stats["stages"][1]["history"].as_array().unwrap().len(), 2);
    assert_eq!(stats["stages"][1]["perSecond"], 0.0, "nothing moved between the samples");

    // Dead letters: the broken entry's, by batch and stage; replayed by batch, it fails again.
    let (_, letters) = api.json(api.get(&format!("/api/dead-letters?batch={first}"))).await;
    let letters = letters["letters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0]["stage"].as_str(), letters[0]["imageId"].as_str()), (Some("detect"), failed[0]["imageId"].as_str()));
    let (_, crop_letters) = api.json(api.get(&format!("/api/dead-letters?batch={first}&stage=crop"))).await;
    assert!(crop_letters["letters"].as_array().unwrap().is_empty());
    let (_, other) = api.json(api.get(&format!("/api/dead-letters?batch={second}"))).await;
    assert!(other["letters"].as_array().unwrap().is_empty());
    for bad in [json!({}), json!({"ids": []}), json!({"all": false}), json!({"ids": [1], "all": true}), json!({"batch": "no such/batch"})] {
        let (code, body) = api.json(api.post("/api/dead-letters/replay").json(&bad)).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    let (code, replayed) = api.json(api.post("/api/dead-letters/replay").json(&json!({"batch": first}))).await;
    assert_eq!((code, replayed["replayed"].as_u64()), (200, Some(1)), "{replayed}");
    let start = Instant::now();
    loop {
        let (_, again) = api.json(api.get(&format!("/api/dead-letters?batch={first}"))).await;
        let again = again["letters"].as_array().unwrap().clone();
        if again.len() == 1 && again[0]["id"] != letters[0]["id"] {
            break;
        }
        assert!(start.elapsed() < BATCH_TIMEOUT, "the replayed letter did not come back: {again:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, by_id) = api.json(api.post("/api/dead-letters/replay").json(&json!({"ids": [letters[0]["id"]]}))).await;
    assert_eq!((code, by_id["replayed"].as_u64()), (200, Some(0)), "a replayed letter is gone: {by_id}");
}
