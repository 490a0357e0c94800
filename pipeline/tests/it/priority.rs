//! Priority bands: a small priority-10 batch submitted behind a large
//! priority-1 batch finishes first, and the large one keeps moving meanwhile.

use std::time::{Duration, Instant};

use crate::support::{photos_zip, Deployment};
use facepipe_core::domain::BatchStatus;

#[tokio::test(flavor = "multi_thread")]
async fn high_priority_batch_overtakes_a_large_low_priority_one_without_starving_it() {
    // One detect slot, every detect job slowed to 150 ms: detect is the queue that matters.
    let env = vec![("PIPELINE_FAULT_SLOW_ON".to_string(), "originals=150".to_string())];
    let d = Deployment::start_with_env(|t| t.stages.detect.concurrency = 1, env).await;
    let (large_count, small_count) = (80, 12);
    let large_zip = photos_zip(d.dir.path(), "large.zip", large_count);
    let small_zip = photos_zip(d.dir.path(), "small.zip", small_count);
    let db = d.db().await;

    let large = d.cli_ok(&["submit", large_zip.to_str().unwrap(), "--project", "bulk", "--priority", "1"]).trim().to_string();
    let start = Instant::now();
    let large_processed = || async { db.batch_status(&large).await.unwrap().map(|s| s.processed).unwrap_or(0) };
    while large_processed().await < 5 {
        assert!(start.elapsed() < Duration::from_secs(120), "the large batch does not start:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let small = d.cli_ok(&["submit", small_zip.to_str().unwrap(), "--project", "urgent", "--priority", "10"]).trim().to_string();
    let large_at_submit = large_processed().await;

    let small_done = d.wait_for_batch(&small, Duration::from_secs(120)).await;
    assert_eq!(small_done.status, BatchStatus::Completed);
    let large_at_small_done = db.batch_status(&large).await.unwrap().unwrap();
    println!(
        "large batch (priority 1): {large_at_submit}/{large_count} processed when the small one was submitted, \
         {}/{large_count} when the small one ({small_count} images, priority 10) completed",
        large_at_small_done.processed
    );
    assert_ne!(large_at_small_done.status, BatchStatus::Completed, "the small batch finished first");
    let remaining_before = large_count as i32 - large_at_submit;
    let remaining_after = large_count as i32 - large_at_small_done.processed;
    assert!(
        remaining_after * 2 >= remaining_before,
        "the small batch went first: the large one did at most half its remaining work meanwhile \
         ({remaining_before} -> {remaining_after} left)"
    );
    assert!(
        large_at_small_done.processed > large_at_submit,
        "the large batch kept making progress (its band gets a share of the pulls)"
    );
    let large_done = d.wait_for_batch(&large, Duration::from_secs(300)).await;
    assert_eq!(large_done.status, BatchStatus::Completed);
    assert_eq!(large_done.processed, large_count as i32);

    // Each band is its own subject and consumer, visible in the queue statistics.
    let stats: serde_json::Value = serde_json::from_str(&d.cli_ok(&["stats", "--json"])).unwrap();
    let detect = stats.as_array().unwrap().iter().find(|s| s["stage"] == "detect").unwrap();
    let bands: Vec<&String> = detect["waiting_by_band"].as_object().unwrap().keys().collect();
    assert_eq!(bands, ["high", "low", "normal"]);
}
