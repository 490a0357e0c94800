//! The dashboard in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver), against `pipeline serve` and the real stage binaries.
//!
//! One story, as an operator lives it: sign in (a wrong token is refused), upload
//! a ZIP of labelled photos through the form, watch the batch reach 100% without
//! reloading, find the planted failures under their reasons, open a cropped image
//! and see its boxes, replay a planted dead letter and see it leave the list, and
//! look at the queues and the batch list, at 1280 px and at phone width.
//! Screenshots of every page go to `target/tmp/dashboard/`. The browser is
//! `/usr/bin/chromium` (Debian's, installed by `scripts/setup --test`), or
//! `PIPELINE_TEST_CHROMIUM`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use facepipe_core::topology::StageName;
use serde_json::{json, Value};
use crate::support::{free_port, labelled_photos, shared_dir, wait_for_port, ApiServer, Deployment, NatsServer, PhotoZip};
use facepipe_core::domain::{BatchStatus, ImageStatus};

const TOKEN: &str = "dashboard-token-71c2";
const BATCH_TIMEOUT: Duration = Duration::from_secs(240);
const PHOTOS: usize = 6;

/// A chromedriver process on a free port, stopped (by its PID) on drop.
pub(crate) struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    pub(crate) fn start(log: &Path) -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (scripts/setup --test installs chromium-driver)");
        wait_for_port(port, Duration::from_secs(30));
        Self { child, url: format!("http://127.0.0.1:{port}") }
    }

    /// A new headless Chromium window of `width` x `height`.
    async fn browser(&self, width: u32, height: u32) -> Client {
        self.browser_with(width, height, &[]).await
    }

    /// A new headless Chromium window of `width` x `height`, with `extra` command-line arguments.
    pub(crate) async fn browser_with(&self, width: u32, height: u32, extra: &[String]) -> Client {
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={width},{height}"),
        ];
        args.extend_from_slice(extra);
        let options = json!({
            "binary": std::env::var("PIPELINE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
            "args": args,
        });
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("chromedriver starts a Chromium session")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the screenshots go.
fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// Runs `script` in the page until it returns something truthy; returns that.
async fn until(c: &Client, what: &str, script: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let value = c.execute(script, vec![]).await.unwrap();
        if !matches!(value, Value::Null | Value::Bool(false)) && value != json!(0) && value != json!("") {
            return value;
        }
        if start.elapsed() > timeout {
            screenshot(c, "timed-out").await;
            let text = c.execute("return document.body.innerText", vec![]).await.unwrap();
            panic!("timed out waiting for {what}; the page says:\n{}", text.as_str().unwrap_or(""));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

/// An HTTP server on 127.0.0.1 serving `photo` at `/photo.jpg` (and 404 elsewhere); returns its base URL.
async fn serve_one_photo(photo: Vec<u8>) -> String {
    let jpeg = ([(axum::http::header::CONTENT_TYPE, "image/jpeg")], photo);
    let app = axum::Router::new().route("/photo.jpg", axum::routing::get(move || async move { jpeg }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_upload_progress_failures_boxes_replay_and_sign_in() {
    // detect starts later, so the test can take one original away before detect reads it.
    let stages = [StageName::Extract, StageName::Crop, StageName::Persist];
    // The URL form's images come from this test's server on 127.0.0.1, which extract refuses by default.
    let allow_loopback = |t: &mut facepipe_core::topology::Topology| t.stages.extract.params.allow_private_addresses = true;
    let mut d = Deployment::start_on_server(NatsServer::start(), allow_loopback, &stages).await;
    let api = ApiServer::start_with_token(&d, Some(TOKEN));
    let driver = Chromedriver::start(&d.dir.path().join("chromedriver.log"));
    let c = driver.browser(1280, 900).await;
    let zip = upload_zip(d.dir.path());

    // Signed out, the page asks for the token and shows nothing else.
    c.goto(&format!("{}/#/batches", api.base)).await.unwrap();
    until(&c, "the sign-in form", "return !!document.querySelector('#login-form')", Duration::from_secs(20)).await;
    assert!(c.find(Locator::Css("#batches")).await.is_err(), "no data before signing in");
    c.find(Locator::Css("#login-token")).await.unwrap().send_keys("not-the-token").await.unwrap();
    c.find(Locator::Css("#login-submit")).await.unwrap().click().await.unwrap();
    let refused = until(&c, "the refusal", "return document.querySelector('#login-error').textContent", Duration::from_secs(10)).await;
    assert!(refused.as_str().unwrap().contains("wrong token"), "{refused}");
    screenshot(&c, "01-sign-in-refused").await;
    let token_field = c.find(Locator::Css("#login-token")).await.unwrap();
    token_field.clear().await.unwrap();
    token_field.send_keys(TOKEN).await.unwrap();
    c.find(Locator::Css("#login-submit")).await.unwrap().click().await.unwrap();
    until(&c, "the batch list", "return !document.querySelector('#login-form') && document.querySelector('#view').innerText.length > 0", Duration::from_secs(10)).await;

    // Upload through the form.
    c.goto(&format!("{}/#/upload", api.base)).await.unwrap();
    until(&c, "the upload form", "return !!document.querySelector('#upload-form')", Duration::from_secs(10)).await;
    c.find(Locator::Css("#upload-file")).await.unwrap().send_keys(zip.to_str().unwrap()).await.unwrap();
    c.find(Locator::Css("#upload-project")).await.unwrap().send_keys("browser").await.unwrap();
    c.find(Locator::Css("#upload-priority")).await.unwrap().select_by_value("7").await.unwrap();
    screenshot(&c, "02-upload").await;
    c.find(Locator::Css("#upload-submit")).await.unwrap().click().await.unwrap();
    let hash = until(&c, "the batch page", "return location.hash.startsWith('#/batch/') && location.hash", Duration::from_secs(30)).await;
    let batch_id = hash.as_str().unwrap().trim_start_matches("#/batch/").to_string();
    let upload_progress = c.execute("return document.querySelector('#upload-progress') ? 1 : 0", vec![]).await.unwrap();
    assert_eq!(upload_progress, json!(0), "the page moved on from the upload form");

    // Once extract has registered every image, one original goes missing: detect
    // will fail on it for good, a dead letter the test replays later.
    let db = d.db.pool().await;
    let start = Instant::now();
    let summary = loop {
        let s = db.batch_status(&batch_id).await.unwrap().expect("the form started a batch");
        if s.image_count.is_some() && s.status == BatchStatus::Processing {
            break s;
        }
        assert!(start.elapsed() < BATCH_TIMEOUT, "extract did not register the images: {s:?}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(summary.image_count, Some(PHOTOS as i32 + 1));
    assert_eq!(summary.project_id, "browser");
    assert_eq!(summary.priority.get(), 7);
    let images = db.results(&batch_id).await.unwrap();
    let taken = images.iter().find(|r| r.entry == labelled_photos()[1].file).unwrap().clone();
    let original = d.dir.path().join("objects").join(taken.original_key.as_deref().unwrap());
    let aside = original.with_extension("aside");
    std::fs::rename(&original, &aside).unwrap();

    // The bar moves to 100% live: the page is never reloaded (the marker survives).
    c.execute("window.__notReloaded = true", vec![]).await.unwrap();
    until(&c, "the batch page's bar", "return !!document.querySelector('#batch-progress')", Duration::from_secs(10)).await;
    screenshot(&c, "03-batch-waiting").await;
    d.start_stage(StageName::Detect);
    until(&c, "100%", "return document.querySelector('#batch-progress').value >= 100", BATCH_TIMEOUT).await;
    assert_eq!(c.execute("return window.__notReloaded === true", vec![]).await.unwrap(), json!(true), "reached 100% without a reload");
    until(&c, "the completed status", "return document.querySelector('#batch-status').textContent.includes('completed')", Duration::from_secs(10)).await;
    let progress = text_of(&c, "#batch-progress-text").await;
    assert!(progress.contains(&format!("{0} / {0}", PHOTOS + 1)), "{progress}");

    // Both planted failures, under their reasons and with the stage that failed.
    let groups = until(
        &c,
        "two failure groups",
        "const g = [...document.querySelectorAll('#failures .failure-group')]; \
         return g.length >= 2 && g.map(e => [e.dataset.stage, e.querySelector('.reason').textContent, e.querySelector('.count').textContent])",
        Duration::from_secs(10),
    )
    .await;
    let groups = groups.as_array().unwrap();
    let reasons: Vec<String> = groups.iter().map(|g| g[1].as_str().unwrap().to_lowercase()).collect();
    let recorded = db.results(&batch_id).await.unwrap();
    for entry in ["planted/broken.jpg", labelled_photos()[1].file.as_str()] {
        let failure = recorded.iter().find(|r| r.entry == entry).unwrap();
        assert_eq!(failure.status, ImageStatus::Failed, "{failure:?}");
        let reason = failure.error.as_deref().unwrap().to_lowercase();
        let group = groups.iter().zip(&reasons).find(|(_, r)| **r == reason).map(|(g, _)| g);
        let group = group.unwrap_or_else(|| panic!("`{reason}` is not among the groups shown: {groups:?}"));
        assert_eq!(group[0], json!("detect"), "{group:?}");
        assert_eq!(group[2].as_str().unwrap().trim(), "1");
    }
    screenshot(&c, "04-batch-completed").await;

    // The download links hold every image, in both formats (fetched by the page, with its session).
    for (format, lines) in [("jsonl", PHOTOS + 1), ("csv", PHOTOS + 2)] {
        let script = format!(
            "const done = arguments[arguments.length - 1]; \
             fetch(document.querySelector('#download-{format}').href).then(r => r.text()).then(done, e => done(String(e)))"
        );
        let body = c.execute_async(&script, vec![]).await.unwrap();
        let body = body.as_str().unwrap();
        assert_eq!(body.lines().count(), lines, "{format}: {body}");
        assert!(body.contains("planted/broken.jpg"), "{format}: {body}");
    }

    // A cropped image: its boxes over the original, and its crops.
    c.find(Locator::Css("#results-status")).await.unwrap().select_by_value("cropped").await.unwrap();
    until(&c, "cropped rows", "return [...document.querySelectorAll('#results tr[data-image-id]')].length > 0 && \
        [...document.querySelectorAll('#results tr[data-image-id]')].every(r => r.textContent.includes('cropped'))", Duration::from_secs(10)).await;
    c.find(Locator::Css("#results tr[data-image-id] a.image-link")).await.unwrap().click().await.unwrap();
    let shown = until(
        &c,
        "the original with its boxes",
        "const img = document.querySelector('#original'); \
         return img && img.complete && img.naturalWidth > 0 && document.querySelectorAll('#image-view .box').length",
        Duration::from_secs(20),
    )
    .await;
    let image_id = c.execute("return location.hash.split('/image/')[1]", vec![]).await.unwrap();
    let image = facepipe_api::listing::image(&db, &batch_id, image_id.as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(shown, json!(image.faces.len()), "one box per face");
    // Each box sits where its face is, relative to the image as drawn.
    let first = c
        .execute(
            "const img = document.querySelector('#original').getBoundingClientRect(); \
             const b = document.querySelector('#image-view .box').getBoundingClientRect(); \
             return [(b.left - img.left) / img.width, (b.top - img.top) / img.height, b.width / img.width]",
            vec![],
        )
        .await
        .unwrap();
    let (face, w, h) = (&image.faces[0], image.width.unwrap() as f64, image.height.unwrap() as f64);
    let expected = [face.x as f64 / w, face.y as f64 / h, face.w as f64 / w];
    for (got, want) in first.as_array().unwrap().iter().zip(expected) {
        assert!((got.as_f64().unwrap() - want).abs() < 0.02, "box at {first} for face {face:?} in {w}x{h}");
    }
    let crops = until(&c, "the crops", "const i = [...document.querySelectorAll('#image-crops img')]; \
        return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0) && i.length", Duration::from_secs(10)).await;
    assert_eq!(crops, json!(image.crop_keys.len()));
    screenshot(&c, "05-image").await;

    // The dead letters of the batch; the original comes back, and its letter is replayed.
    std::fs::rename(&aside, &original).unwrap();
    c.goto(&format!("{}/#/dead-letters?batch={batch_id}", api.base)).await.unwrap();
    let rows = until(&c, "the batch's dead letters", "const r = [...document.querySelectorAll('#dead-letters tr[data-letter-id]')]; \
        return r.length >= 2 && r.map(x => [x.dataset.letterId, x.textContent])", Duration::from_secs(20)).await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "the two planted failures: {rows:?}");
    let letter_id = rows.iter().find(|r| r[1].as_str().unwrap().contains(&taken.image_id)).expect("the missing original's letter")[0].clone();
    let letter_id = letter_id.as_str().unwrap().to_string();
    screenshot(&c, "06-dead-letters").await;
    let row = format!("#dead-letters tr[data-letter-id='{letter_id}']");
    c.find(Locator::Css(&format!("{row} .replay-one"))).await.unwrap().click().await.unwrap();
    until(&c, "the confirmation", "return document.querySelector('#confirm').open", Duration::from_secs(5)).await;
    let question = text_of(&c, "#confirm-text").await;
    assert!(question.contains(&letter_id), "{question}");
    screenshot(&c, "07-replay-confirm").await;
    c.find(Locator::Css("#confirm-yes")).await.unwrap().click().await.unwrap();
    until(&c, "the letter to leave the list", &format!("return !document.querySelector(\"{row}\")"), Duration::from_secs(20)).await;
    until(&c, "the replay's notice", "return document.querySelector('#messages .message.ok')?.textContent", Duration::from_secs(5)).await;
    // Replayed, the image goes through detect again, now with its original.
    let start = Instant::now();
    loop {
        let image = facepipe_api::listing::image(&db, &batch_id, &taken.image_id).await.unwrap().unwrap();
        let batch = db.batch_status(&batch_id).await.unwrap().unwrap();
        if image.status != ImageStatus::Pending && image.status != ImageStatus::Failed && batch.status == BatchStatus::Completed {
            assert_eq!(batch.failed, 1, "only the broken entry is still failed");
            break;
        }
        assert!(start.elapsed() < BATCH_TIMEOUT, "the replayed image was not processed: {image:?}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let remaining = c.execute("return document.querySelectorAll('#dead-letters tr[data-letter-id]').length", vec![]).await.unwrap();
    assert_eq!(remaining, json!(1), "the broken entry's letter stays");

    // Image URLs through the second form: one downloads, one is missing.
    let photo = std::fs::read(shared_dir().join("data/faces").join(&labelled_photos()[0].file)).unwrap();
    let host = serve_one_photo(photo).await;
    c.goto(&format!("{}/#/upload", api.base)).await.unwrap();
    until(&c, "the URL form", "return !!document.querySelector('#urls-form')", Duration::from_secs(10)).await;
    c.find(Locator::Css("#urls-list")).await.unwrap().send_keys(&format!("{host}/photo.jpg\n\n{host}/missing.jpg\n")).await.unwrap();
    c.find(Locator::Css("#urls-project")).await.unwrap().send_keys("browser-urls").await.unwrap();
    c.find(Locator::Css("#urls-submit")).await.unwrap().click().await.unwrap();
    let url_hash = until(&c, "the URL batch's page", &format!("return location.hash.startsWith('#/batch/') && location.hash != '#/batch/{batch_id}' && location.hash"), Duration::from_secs(30)).await;
    until(&c, "the URL batch to complete", "return document.querySelector('#batch-status')?.textContent.includes('completed')", BATCH_TIMEOUT).await;
    let progress = text_of(&c, "#batch-progress-text").await;
    assert!(progress.contains("2 / 2") && progress.contains("1 failed"), "{url_hash}: {progress}");

    // Queues, live, with the replicas named.
    c.goto(&format!("{}/#/queues", api.base)).await.unwrap();
    let detect = until(&c, "the queues", "const r = document.querySelector('#queues tr[data-stage=\"detect\"]'); \
        return r && r.textContent.includes(':') && r.textContent", Duration::from_secs(20)).await;
    let detect_pid = d.stages.iter().find(|(s, _)| *s == StageName::Detect).unwrap().1.id();
    assert!(detect.as_str().unwrap().contains(&detect_pid.to_string()), "detect's replica by pid: {detect}");
    tokio::time::sleep(Duration::from_secs(5)).await; // a few samples, for the throughput line
    screenshot(&c, "08-queues").await;

    // The batch list, newest first, with its row.
    c.goto(&format!("{}/#/batches", api.base)).await.unwrap();
    let row = until(&c, "the batch's row", &format!("return document.querySelector(\"#batches tr[data-batch-id='{batch_id}']\")?.textContent"), Duration::from_secs(20)).await;
    assert!(row.as_str().unwrap().contains("browser") && row.as_str().unwrap().contains("completed"), "{row}");
    screenshot(&c, "09-batches").await;

    // An API error is a message, not a blank panel.
    c.goto(&format!("{}/#/batch/no-such-batch", api.base)).await.unwrap();
    let error = until(&c, "an error message", "return document.querySelector('#messages .message.error')?.textContent", Duration::from_secs(10)).await;
    assert!(error.as_str().unwrap().contains("no-such-batch"), "{error}");

    // Phone width: nothing wider than the screen.
    c.set_window_size(390, 844).await.unwrap();
    for (page, name) in [(format!("#/batch/{batch_id}"), "10-phone-batch"), (format!("#/batch/{batch_id}/image/{}", image.image_id), "11-phone-image"), ("#/queues".into(), "12-phone-queues")] {
        c.goto(&format!("{}/{page}", api.base)).await.unwrap();
        until(&c, "the page", "return document.querySelector('#view').innerText.length > 20 && !document.querySelector('#view').innerText.includes('Loading')", Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let overflow = c.execute("return document.documentElement.scrollWidth - window.innerWidth", vec![]).await.unwrap();
        assert!(overflow.as_i64().unwrap() <= 0, "{name}: the page is {overflow} px wider than the phone");
        screenshot(&c, name).await;
    }

    // Signed out, the page asks for the token again.
    c.set_window_size(1280, 900).await.unwrap();
    c.find(Locator::Css("#logout")).await.unwrap().click().await.unwrap();
    until(&c, "the sign-in form", "return !!document.querySelector('#login-form')", Duration::from_secs(10)).await;
    c.close().await.unwrap();
}

/// The sign-in and CSRF rules over plain HTTP, as a browser (or an attacker's page) would send them.
#[tokio::test(flavor = "multi_thread")]
async fn session_cookie_csrf_and_same_origin_rules() {
    let d = Deployment::start_on_server(NatsServer::start(), |_| {}, &[]).await;
    let api = ApiServer::start_with_token(&d, Some(TOKEN));
    let http = &api.client;
    let url = |path: &str| format!("{}{path}", api.base);
    let host = api.base.trim_start_matches("http://").to_string();

    // The page and its assets are served without a token, with a strict policy.
    let page = http.get(url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(policy.contains("default-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    for (asset, kind) in [("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
        let r = http.get(url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(kind));
    }
    let session: Value = http.get(url("/ui/session")).send().await.unwrap().json().await.unwrap();
    assert_eq!(session, json!({"tokenRequired": true, "signedIn": false, "csrf": null}));
    assert_eq!(http.get(url("/api/batches")).send().await.unwrap().status(), 401);

    // A wrong token gets no cookie; the right one an HttpOnly, SameSite=Strict session.
    let wrong = http.post(url("/ui/login")).json(&json!({"token": "guess"})).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let cross_site = http.post(url("/ui/login")).header("origin", "http://evil.example").json(&json!({"token": TOKEN})).send().await.unwrap();
    assert_eq!(cross_site.status(), 403, "no sign-in from another site's page");
    let login = http.post(url("/ui/login")).header("origin", api.base.as_str()).json(&json!({"token": TOKEN})).send().await.unwrap();
    assert_eq!(login.status(), 200);
    let set_cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict") && set_cookie.contains("Path=/"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let csrf = login.json::<Value>().await.unwrap()["csrf"].as_str().unwrap().to_string();
    assert_ne!(cookie.split('=').nth(1).unwrap(), csrf, "the CSRF token is not the cookie");
    let session: Value = http.get(url("/ui/session")).header("cookie", &cookie).send().await.unwrap().json().await.unwrap();
    assert_eq!(session["signedIn"], true);
    assert_eq!(session["csrf"], csrf.as_str());

    // Reads need only the cookie; changes need the cookie, the CSRF token and this origin.
    assert_eq!(http.get(url("/api/batches")).header("cookie", &cookie).send().await.unwrap().status(), 200);
    let replay = |cookie: Option<&str>, csrf: Option<&str>, origin: Option<&str>| {
        let mut r = http.post(url("/api/dead-letters/replay")).json(&json!({"ids": [1]}));
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        if let Some(t) = csrf {
            r = r.header("x-csrf-token", t);
        }
        if let Some(o) = origin {
            r = r.header("origin", o).header("host", &host);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(replay(Some(&cookie), None, None).await, 403, "the cookie alone changes nothing");
    assert_eq!(replay(Some(&cookie), Some("0000"), None).await, 403);
    assert_eq!(replay(Some(&cookie), Some(&csrf), Some("http://evil.example")).await, 403, "not from another site");
    assert_eq!(replay(Some(&cookie), Some(&csrf), Some(&api.base)).await, 200);
    assert_eq!(replay(None, Some(&csrf), None).await, 401, "the CSRF token is no credential");
    // Clients that are not browsers keep using the bearer token, without CSRF tokens.
    let bearer = http.post(url("/api/dead-letters/replay")).bearer_auth(TOKEN).json(&json!({"ids": [1]})).send().await.unwrap();
    assert_eq!(bearer.status(), 200);

    // Signing out ends the session on the server, not only in the browser.
    assert_eq!(http.post(url("/ui/logout")).header("cookie", &cookie).send().await.unwrap().status(), 403, "logout needs the CSRF token");
    let out = http.post(url("/ui/logout")).header("cookie", &cookie).header("x-csrf-token", &csrf).send().await.unwrap();
    assert_eq!(out.status(), 204);
    assert!(out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(http.get(url("/api/batches")).header("cookie", &cookie).send().await.unwrap().status(), 401);

    // Without a token (loopback), a browser on another site still cannot change state.
    drop(api);
    let open = ApiServer::start_with_token(&d, None);
    let session: Value = open.client.get(format!("{}/ui/session", open.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(session, json!({"tokenRequired": false, "signedIn": true, "csrf": null}));
    let from = |site: &'static str| {
        let r = open.client.post(format!("{}/api/dead-letters/replay", open.base)).header("sec-fetch-site", site).json(&json!({"ids": [1]}));
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(from("cross-site").await, 403);
    assert_eq!(from("same-origin").await, 200);
}

/// What watching costs the API server: one batch with nobody watching, then one with
/// ten browsers on its page (live events, results and failures refreshing), on the
/// same server. A measurement, not an assertion: run it with
/// `cargo test --release -p pipeline --test dashboard -- --ignored --nocapture ten_browsers`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; prints figures (see docs/dashboard.md)"]
async fn ten_browsers_watching_one_batch() {
    const COPIES: usize = 4;
    const BROWSERS: usize = 10;
    let mut d = Deployment::start(|_| {}).await;
    // Two detect replicas keep the batch short while the browsers take CPU too.
    d.start_stage(StageName::Detect);
    let api = ApiServer::start_with_token(&d, Some(TOKEN));
    let driver = Chromedriver::start(&d.dir.path().join("chromedriver.log"));
    let (zip, image_count) = PhotoZip::of(&labelled_photos()).copies(COPIES).write(&d.dir.path().join("watched.zip"));
    let db = d.db.pool().await;
    let usage = || pipeline::processes::Usage::of(api.child.id(), false);

    let mut rows = Vec::new();
    for watchers in [0, BROWSERS] {
        let (before, started) = (usage(), Instant::now());
        let form = reqwest::multipart::Form::new()
            .text("projectId", format!("watched-by-{watchers}"))
            .part("file", reqwest::multipart::Part::bytes(std::fs::read(&zip).unwrap()).file_name("watched.zip"));
        let started_batch: Value =
            api.client.post(format!("{}/api/batch/upload-zip", api.base)).bearer_auth(TOKEN).multipart(form).send().await.unwrap().json().await.unwrap();
        let batch_id = started_batch["batchId"].as_str().unwrap().to_string();
        let mut browsers = Vec::new();
        for _ in 0..watchers {
            let c = driver.browser(1280, 900).await;
            c.goto(&format!("{}/#/batch/{batch_id}", api.base)).await.unwrap();
            until(&c, "the sign-in form", "return !!document.querySelector('#login-form')", Duration::from_secs(20)).await;
            c.find(Locator::Css("#login-token")).await.unwrap().send_keys(TOKEN).await.unwrap();
            c.find(Locator::Css("#login-submit")).await.unwrap().click().await.unwrap();
            until(&c, "the batch page", "return !!document.querySelector('#batch-progress')", Duration::from_secs(20)).await;
            browsers.push(c);
        }
        loop {
            let s = db.batch_status(&batch_id).await.unwrap().unwrap();
            if s.status == BatchStatus::Completed {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(900), "{s:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for c in &browsers {
            until(c, "100% in every browser", "return document.querySelector('#batch-progress').value >= 100", Duration::from_secs(30)).await;
        }
        let (after, seconds) = (usage(), started.elapsed().as_secs_f64());
        rows.push((watchers, image_count, seconds, after.cpu_seconds - before.cpu_seconds, before.rss_mib, after.rss_mib, after.peak_rss_mib));
        for c in browsers {
            c.close().await.unwrap();
        }
    }
    println!("\nAPI server (`pipeline serve`, this build) while one batch of {} images runs:", image_count);
    println!("{:>9} {:>9} {:>12} {:>13} {:>15} {:>14}", "browsers", "seconds", "CPU seconds", "CPU % of core", "RSS MiB before", "after (peak)");
    for (watchers, _, seconds, cpu, rss_before, rss_after, peak) in &rows {
        println!("{watchers:>9} {seconds:>9.1} {cpu:>12.2} {:>12.1}% {rss_before:>15.1} {rss_after:>7.1} ({peak:.1})", cpu / seconds * 100.0);
    }
    let (base, watched) = (&rows[0], &rows[1]);
    println!(
        "ten browsers cost the server {:.2} CPU seconds more ({:.1}% of a core over the batch) and {:.1} MiB more resident memory",
        watched.3 - base.3,
        (watched.3 / watched.2 - base.3 / base.2) * 100.0,
        watched.5 - base.5
    );
}

/// `PHOTOS` labelled photos and one planted bad entry.
fn upload_zip(dir: &Path) -> PathBuf {
    PhotoZip::of(labelled_photos().iter().take(PHOTOS)).with("planted/broken.jpg", *b"this is not a JPEG").write(&dir.join("photos.zip")).0
}
