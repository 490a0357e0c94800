//! Structured logs: with `PIPELINE_LOG_FORMAT=json` every line is a JSON object,
//! and every line about an image names its batch and image, the handlers' own too.

use std::time::Duration;

use crate::support::{labelled_photos, Deployment, PhotoZip};
use facepipe_core::domain::BatchStatus;

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_name_the_batch_and_image_on_every_line_about_an_image() {
    let env = vec![
        ("PIPELINE_LOG_FORMAT".to_string(), "json".to_string()),
        // The handlers' per-image lines are at debug level.
        ("RUST_LOG".to_string(), "info,pipeline=debug,extract=debug,detect=debug,crop=debug,persist=debug".to_string()),
    ];
    let d = Deployment::start_with_env(|_| {}, env).await;
    let photos = labelled_photos();
    let (zip, _) = PhotoZip::of(photos.iter().take(3)).with("broken.jpg", *b"\xff\xd8\xff\xe0 truncated").write(&d.dir.path().join("batch.zip"));
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "logs"]).trim().to_string();
    let status = d.wait_for_batch(&batch, Duration::from_secs(120)).await;
    assert_eq!(status.status, BatchStatus::Completed, "{status:?}");

    let mut about_images = 0;
    let mut handler_lines = 0;
    let mut failure_named = false;
    for entry in std::fs::read_dir(d.dir.path()).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let stage = path.file_name().unwrap().to_string_lossy().split('-').next().unwrap().to_string();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {line}", path.display()));
            let span = &value["span"];
            if span["name"] != "message" {
                continue;
            }
            // extract's job is about a batch, not one image.
            if stage == "extract" {
                continue;
            }
            about_images += 1;
            assert_eq!(span["batch"], batch.as_str(), "{line}");
            assert!(span["image"].as_str().is_some_and(|i| !i.is_empty()), "{line}");
            let message = value["fields"]["message"].as_str().unwrap_or("");
            if ["detected", "outcome recorded"].contains(&message) {
                handler_lines += 1;
            }
            if message.contains("dead-lettering") {
                failure_named = true;
            }
        }
    }
    assert!(about_images > 0, "no per-image lines were logged:\n{}", d.logs());
    assert!(handler_lines > 0, "the handlers' own lines carry the ids too:\n{}", d.logs());
    assert!(failure_named, "the broken image's failure is logged with its ids:\n{}", d.logs());
}
