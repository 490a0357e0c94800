//! The HTTP surface against an attacker on the network, a hostile uploader and a
//! hostile web page, through `pipeline serve` over real HTTP (and, for DNS rebinding,
//! headless Chromium told that a name resolves to this server): spreadsheet-safe CSV,
//! the `Host` rule, stored files served as data, and failed authentications limited
//! per client.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::header;
use serde_json::{json, Value};

use crate::dashboard::Chromedriver;
use crate::support::{labelled_photos, ApiServer, Deployment, PhotoZip};

const TOKEN: &str = "hardening-token-5d21";

/// A client whose connections come from `source` (127.0.0.2, say: another client of the same server).
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(source.parse::<IpAddr>().unwrap()).build().unwrap()
}

/// Uploads `zip` as project `hostile` with the token; returns the batch id once the batch is done.
async fn upload_and_wait(api: &ApiServer, zip: &std::path::Path) -> String {
    let form = reqwest::multipart::Form::new()
        .text("projectId", "hostile")
        .part("file", reqwest::multipart::Part::bytes(std::fs::read(zip).unwrap()).file_name("batch.zip"));
    let response = api.client.post(format!("{}/api/batch/upload-zip", api.base)).bearer_auth(TOKEN).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let started: Value = response.json().await.unwrap();
    let batch = started["batchId"].as_str().unwrap().to_string();
    for _ in 0..600 {
        let status: Value =
            api.client.get(format!("{}/api/batch/status/{batch}", api.base)).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
        if status["batch"]["status"] == "completed" {
            return batch;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("batch {batch} did not complete");
}

/// A hostile uploader names entries as spreadsheet formulas; the CSV export, read back
/// as data by a CSV reader, holds every name as text (a leading `'`), every cell quoted.
/// A hostile entry holding HTML is served as a download that nothing runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_uploaders_names_and_files_stay_data() {
    let d = Deployment::start(|_| {}).await;
    let api = ApiServer::start_with_token(&d, Some(TOKEN));
    let photos = labelled_photos();
    let photo = crate::support::photo_bytes(&photos[0]);
    let formulas = ["=cmd|' /C calc'!A0.jpg", "+SUM(1+1)*cmd|a.jpg", "-2+3.jpg", "@SUM(A1).jpg", "\tx.jpg"];
    let mut zip = PhotoZip::default();
    for name in formulas {
        zip = zip.with(name, photo.clone());
    }
    let html = b"<html><body><script>document.title='ran'</script></body></html>".to_vec();
    let (zip, _) = zip.with("page.jpg", html).write(&d.dir.path().join("hostile.zip"));
    let batch = upload_and_wait(&api, &zip).await;

    let response = api.client.get(format!("{}/api/batch/{batch}/export?format=csv", api.base)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header = reader.headers().unwrap().clone();
    let entry_column = header.iter().position(|h| h == "entry").unwrap();
    let mut entries = Vec::new();
    for record in reader.records() {
        let record = record.unwrap();
        for cell in record.iter() {
            assert!(!cell.starts_with(['=', '+', '-', '@', '\t', '\r']), "a cell a spreadsheet would run: {cell:?}");
        }
        entries.push(record[entry_column].to_string());
    }
    for name in formulas {
        assert!(entries.contains(&format!("'{name}")), "{name:?} is in the export as text: {entries:?}");
    }
    for line in text.lines().skip(1) {
        assert!(line.starts_with('"') && line.ends_with('"'), "every cell quoted: {line}");
    }

    // Stored files: the HTML posing as page.jpg is a download with a sandbox; a photo is shown inline.
    let results: Value = api.client.get(format!("{}/api/batch/{batch}/results?pageSize=100", api.base)).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    let id_of = |entry: &str| results["results"].as_array().unwrap().iter().find(|r| r["entry"] == entry).unwrap()["imageId"].as_str().unwrap().to_string();
    for (entry, media_type, disposition) in [("page.jpg", "application/octet-stream", "attachment"), (formulas[0], "image/jpeg", "inline")] {
        let url = format!("{}/api/batch/{batch}/images/{}/original", api.base, id_of(entry));
        let response = api.client.get(url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), 200, "{entry}");
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], media_type, "{entry}");
        assert!(h[header::CONTENT_DISPOSITION].to_str().unwrap().starts_with(disposition), "{entry}: {:?}", h[header::CONTENT_DISPOSITION]);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{entry}");
        assert!(h[header::CONTENT_SECURITY_POLICY].to_str().unwrap().starts_with("sandbox"), "{entry}");
    }
    // Every API answer is nosniff, errors too.
    let missing = api.client.get(format!("{}/api/batch/status/nope", api.base)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!((missing.status().as_u16(), &missing.headers()[header::X_CONTENT_TYPE_OPTIONS]), (404, &"nosniff".parse().unwrap()));
}

/// Sends `method path` to `api` with `Host: host` (and, for a write, the headers a
/// rebinding page's browser would add: its own origin, same-origin); the status.
async fn with_host(api: &ApiServer, method: &str, path: &str, host: &str, token: Option<&str>) -> u16 {
    let url = format!("{}{path}", api.base);
    let mut request = match method {
        "POST" => api
            .client
            .post(url)
            .header(header::ORIGIN, format!("http://{host}"))
            .header("sec-fetch-site", "same-origin")
            .json(&json!({"batch": "x"})),
        _ => api.client.get(url),
    }
    .header(header::HOST, host);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

/// DNS rebinding, as the probe did it: without a token, a request naming another host
/// (`Host: evil.example:<port>`, `Origin` the same, `Sec-Fetch-Site: same-origin`) is
/// refused, reads and writes alike; the server's addresses and loopback names are
/// answered. With a token any name is answered unless `api.allowed_hosts` says otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_that_rebinds_its_name_to_this_server_is_refused() {
    let d = Deployment::start(|_| {}).await;
    let open = ApiServer::start_with_token(&d, None);
    let evil = format!("evil.example:{}", open.port);
    for (method, path) in [("POST", "/api/dead-letters/replay"), ("GET", "/api/batches"), ("GET", "/"), ("GET", "/openapi.json")] {
        assert_eq!(with_host(&open, method, path, &evil, None).await, 403, "{method} {path} with Host {evil}");
    }
    for host in [format!("127.0.0.1:{}", open.port), format!("localhost:{}", open.port), format!("[::1]:{}", open.port)] {
        assert_eq!(with_host(&open, "GET", "/api/batches", &host, None).await, 200, "Host {host}");
    }
    let guarded = ApiServer::start_with_token(&d, Some(TOKEN));
    let evil = format!("evil.example:{}", guarded.port);
    assert_eq!(with_host(&guarded, "GET", "/api/batches", &evil, Some(TOKEN)).await, 200, "a token guards it");
    assert_eq!(with_host(&guarded, "GET", "/api/batches", &evil, None).await, 401);
    drop((open, guarded));

    let listed = Deployment::start(|t| t.api.allowed_hosts = vec!["faces.example".into()]).await;
    for token in [None, Some(TOKEN)] {
        let api = ApiServer::start_with_token(&listed, token);
        let port = api.port;
        assert_eq!(with_host(&api, "GET", "/api/batches", &format!("faces.example:{port}"), token).await, 200, "token {token:?}");
        assert_eq!(with_host(&api, "GET", "/api/batches", &format!("evil.example:{port}"), token).await, 403, "token {token:?}");
    }
}

/// The same rebinding in a real browser: Chromium resolves evil.example to this
/// server; the page it loads there is the refusal, and its own requests are refused,
/// while the dashboard loads under a loopback name.
#[tokio::test(flavor = "multi_thread")]
async fn a_browser_at_a_rebound_name_gets_nothing() {
    let d = Deployment::start(|_| {}).await;
    let api = ApiServer::start_with_token(&d, None);
    let driver = Chromedriver::start(&d.dir.path().join("chromedriver.log"));
    let browser = driver.browser_with(1280, 800, &["--host-resolver-rules=MAP evil.example 127.0.0.1".to_string()]).await;
    browser.goto(&format!("http://evil.example:{}/", api.port)).await.unwrap();
    let text = browser.execute("return document.body.innerText", vec![]).await.unwrap();
    assert!(text.as_str().unwrap().contains("does not answer to the host name `evil.example`"), "{text}");
    let status = browser
        .execute_async("fetch('/api/batches').then(r => arguments[0](r.status))", vec![])
        .await
        .unwrap();
    assert_eq!(status, json!(403), "the rebound page's own request");
    browser.goto(&format!("http://localhost:{}/", api.port)).await.unwrap();
    let title = browser.title().await.unwrap();
    assert!(title.contains("facepipe"), "the dashboard under a loopback name: {title}");
    browser.close().await.unwrap();
}

/// An attacker guessing the token: past `auth_failures_per_minute` wrong guesses a
/// client gets 429 with `Retry-After`, the right token included, on the sign-in and on
/// `/api` alike, while another client is unaffected; the log holds a few lines, not one
/// per guess.
#[tokio::test(flavor = "multi_thread")]
async fn guessing_the_token_is_limited_per_client_and_logged_sparingly() {
    let d = Deployment::start(|t| t.api.auth_failures_per_minute = 5).await;
    let api = ApiServer::start_with_token(&d, Some(TOKEN));
    let attacker = client_from("127.0.0.2");
    let login = |client: &reqwest::Client, token: &str| {
        client.post(format!("{}/ui/login", api.base)).header(header::ORIGIN, api.base.clone()).json(&json!({"token": token})).send()
    };
    let mut codes = Vec::new();
    for i in 0..300 {
        let response = login(&attacker, &format!("guess-{i}")).await.unwrap();
        codes.push(response.status().as_u16());
        if response.status() == 429 {
            let wait: u64 = response.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&wait), "Retry-After {wait}");
        }
    }
    assert_eq!(&codes[..5], &[401; 5], "the allowance");
    assert!(codes[5..].iter().all(|c| *c == 429), "then refused: {:?}", &codes[..12]);
    assert_eq!(login(&attacker, TOKEN).await.unwrap().status(), 429, "the right token too, while blocked");
    let bearer = |client: &reqwest::Client, token: &str| client.get(format!("{}/api/batches", api.base)).bearer_auth(token).send();
    assert_eq!(bearer(&attacker, TOKEN).await.unwrap().status(), 429, "on /api as well");

    // Another client is not blocked; its own wrong bearer tokens are limited the same way.
    let other = client_from("127.0.0.3");
    assert_eq!(login(&other, TOKEN).await.unwrap().status(), 200);
    let codes: Vec<u16> = futures::future::join_all((0..8).map(|i| bearer(&other, &format!("wrong-{i}")))).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect();
    assert_eq!(codes.iter().filter(|c| **c == 401).count(), 5, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 3, "{codes:?}");

    let log = std::fs::read_to_string(&api.log).unwrap();
    let lines = log.lines().filter(|l| l.contains("refused") && l.contains("authentication")).count();
    assert!((1..=12).contains(&lines), "{lines} log lines for 308 failures:\n{log}");
}
