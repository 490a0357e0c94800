//! Outcome recording against a real PostgreSQL: idempotent upserts, counters
//! that cannot double count, and a batch that completes exactly once.

use facepipe_core::domain::{Detector, Priority, StageName};
use facepipe_ledger::{Db, NewImage, Recorded};
use facepipe_core::messages::{FaceBox, ImageRef, ImageStatus, Outcome};
use crate::support::TestDb;
use facepipe_core::domain::BatchStatus;

fn outcome(image_id: &str, status: ImageStatus) -> Outcome {
    Outcome {
        image: ImageRef::new("b-1", image_id, Priority::DEFAULT),
        status,
        width: Some(640),
        height: Some(480),
        faces: vec![FaceBox::new(1.0, 2.0, 30.0, 40.0, 0.9)],
        crop_keys: vec![format!("batches/b-1/crops/{image_id}-0.jpg")],
        error: None,
        failed_stage: None,
        attempts: 1,
        detector: Some(Detector::Yunet),
    }
}

fn image(id: &str) -> NewImage {
    NewImage {
        image_id: id.into(),
        entry_name: format!("{id}.jpg"),
        original_key: format!("batches/b-1/originals/{id}.jpg"),
        record_id: None,
        error: None,
    }
}

/// A ZIP's extract job of project `project`.
fn job(project: &str, zip: &str) -> facepipe_core::messages::ExtractJob {
    facepipe_core::messages::ExtractJob::for_zip(None, project.into(), Priority::DEFAULT, zip.into())
}

#[tokio::test]
async fn same_outcome_twice_leaves_one_row_and_unchanged_counters() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    assert!(db.migrate().await.unwrap().is_empty(), "migrations run once");

    db.insert_batch("b-1", &job("proj", "uploads/b-1.zip"), "uploads/b-1.zip").await.unwrap();
    db.insert_batch("b-1", &job("proj", "uploads/b-1.zip"), "uploads/b-1.zip").await.unwrap();
    db.insert_images("b-1", &[image("0000000"), image("0000001")]).await.unwrap();
    db.insert_images("b-1", &[image("0000000"), image("0000001")]).await.unwrap();
    assert!(!db.finish_ingest("b-1", 2, &["notes.txt".into()]).await.unwrap());

    let first = db.record_outcome(&outcome("0000000", ImageStatus::Cropped)).await.unwrap();
    assert!(first.first && !first.completed_batch);
    let progress = first.progress.unwrap();
    assert_eq!((progress.processed, progress.failed, progress.image_count), (1, 0, Some(2)));
    let again = db.record_outcome(&outcome("0000000", ImageStatus::Cropped)).await.unwrap();
    assert_eq!(again, Recorded { first: false, completed_batch: false, progress: None });
    // A later, different outcome for the same image does not overwrite the first either.
    let failed = Outcome::failed(outcome("0000000", ImageStatus::Failed).image, StageName::Crop, "boom".into(), 3);
    assert!(!db.record_outcome(&failed).await.unwrap().first);

    let s = db.batch_status("b-1").await.unwrap().unwrap();
    assert_eq!((s.processed, s.failed, s.faces, s.skipped), (1, 0, 1, 1));
    assert_eq!(s.status, BatchStatus::Processing);
    assert_eq!(s.progress_percent, 50.0);

    // The last image completes the batch, exactly once.
    let last = db.record_outcome(&outcome("0000001", ImageStatus::NoFace)).await.unwrap();
    assert!(last.first && last.completed_batch && last.progress.unwrap().completed);
    let replay = db.record_outcome(&outcome("0000001", ImageStatus::NoFace)).await.unwrap();
    assert_eq!(replay, Recorded { first: false, completed_batch: false, progress: None });
    let s = db.batch_status("b-1").await.unwrap().unwrap();
    assert_eq!((s.status, s.processed, s.failed), (BatchStatus::Completed, 2, 0));
    assert!(s.completed_at.is_some());

    let rows = db.results("b-1").await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].status, ImageStatus::Cropped);
    assert_eq!(rows[0].faces.len(), 1);
    assert_eq!(rows[0].crop_keys, vec!["batches/b-1/crops/0000000-0.jpg"]);
}

#[tokio::test]
async fn unknown_images_are_permanent_errors_and_empty_batches_complete() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    let err = db.record_outcome(&outcome("0000009", ImageStatus::Cropped)).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");

    db.insert_batch("b-1", &job("proj", "empty.zip"), "empty.zip").await.unwrap();
    assert!(db.finish_ingest("b-1", 0, &[]).await.unwrap(), "an empty archive completes at once");
    assert!(!db.finish_ingest("b-1", 0, &[]).await.unwrap(), "and only once");
    assert_eq!(db.batch_status("b-1").await.unwrap().unwrap().status, BatchStatus::Completed);
}

#[tokio::test]
async fn batch_completes_when_ingest_finishes_after_the_last_outcome() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    db.insert_batch("b-1", &job("proj", "x.zip"), "x.zip").await.unwrap();
    db.insert_images("b-1", &[image("0000000")]).await.unwrap();
    // persist can record an image before extract has finished reading the archive.
    assert!(!db.record_outcome(&outcome("0000000", ImageStatus::Cropped)).await.unwrap().completed_batch);
    assert_eq!(db.batch_status("b-1").await.unwrap().unwrap().status, BatchStatus::Ingesting);
    assert!(db.finish_ingest("b-1", 1, &[]).await.unwrap());
    assert_eq!(db.batch_status("b-1").await.unwrap().unwrap().status, BatchStatus::Completed);
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() {
    let test_db = TestDb::create().await;
    let db = Db::connect(&test_db.url.parse().unwrap(), 8).unwrap();
    let runs = futures::future::join_all((0..4).map(|_| db.migrate())).await;
    let mut applied: Vec<i32> = runs.into_iter().flat_map(|r| r.unwrap()).collect();
    applied.sort();
    assert_eq!(applied, [1, 2, 3, 4, 5], "every migration once, whichever process ran it");
    let history = test_db.client().await.query("SELECT version FROM refinery_schema_history ORDER BY version", &[]).await.unwrap();
    assert_eq!(history.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_database_migrated_by_the_earlier_runner_is_adopted_without_running_anything_again() {
    let test_db = TestDb::create().await;
    // What the pipeline's own runner left behind: the schema, and its versions in `schema_migrations`.
    let client = test_db.client().await;
    client.batch_execute(include_str!("../../ledger/migrations/V1__batches_and_images.sql")).await.unwrap();
    client.batch_execute(include_str!("../../ledger/migrations/V2__record_ids.sql")).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations (version) VALUES (1), (2);
             INSERT INTO batches (batch_id, project_id, source) VALUES ('kept', 'p', 'uploads/kept.zip');",
        )
        .await
        .unwrap();

    let db = Db::connect(&test_db.url.parse().unwrap(), 2).unwrap();
    // The two it had are adopted, not run again; only the later ones run.
    assert_eq!(db.migrate().await.unwrap(), [3, 4, 5], "an adopted migration does not run again");
    assert!(db.migrate().await.unwrap().is_empty());
    let legacy = client.query_one("SELECT to_regclass('schema_migrations') IS NULL", &[]).await.unwrap();
    assert!(legacy.get::<_, bool>(0), "the old table is gone once adopted");
    let history = client.query("SELECT version FROM refinery_schema_history ORDER BY version", &[]).await.unwrap();
    assert_eq!(history.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert!(db.batch_status("kept").await.unwrap().is_some(), "the data is untouched");
}

#[tokio::test]
async fn results_page_by_number_and_by_key_and_stream_past_a_chunk() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    db.insert_batch("b-1", &job("proj", "uploads/b-1.zip"), "uploads/b-1.zip").await.unwrap();
    // More than one streaming chunk (1,000 rows), and a second batch that must not leak in.
    let ids: Vec<String> = (0..2345).map(facepipe_core::keys::image_id).collect();
    let images: Vec<NewImage> = ids.iter().map(|id| image(id)).collect();
    db.insert_images("b-1", &images).await.unwrap();
    db.insert_batch("b-2", &job("proj", "uploads/b-2.zip"), "uploads/b-2.zip").await.unwrap();
    db.insert_images("b-2", &images[..10]).await.unwrap();

    use facepipe_ledger::PageStart;
    let by_number = db.results_page("b-1", &PageStart::Offset(2300), 100).await.unwrap();
    assert_eq!(by_number.iter().map(|r| r.image_id.as_str()).collect::<Vec<_>>(), ids[2300..].iter().map(String::as_str).collect::<Vec<_>>());
    let by_key = db.results_page("b-1", &PageStart::After(ids[2299].clone()), 100).await.unwrap();
    assert_eq!(by_key, by_number);
    assert!(db.results_page("b-1", &PageStart::Offset(2345), 100).await.unwrap().is_empty());
    assert!(db.results_page("b-1", &PageStart::After(ids[2344].clone()), 100).await.unwrap().is_empty());
    assert_eq!(db.results_page("b-1", &PageStart::Offset(0), 3).await.unwrap()[2].image_id, ids[2]);

    // Walking by key visits every image once, in order.
    let (mut walked, mut start) = (Vec::new(), PageStart::Offset(0));
    loop {
        let page = db.results_page("b-1", &start, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        start = PageStart::After(last.image_id.clone());
        walked.extend(page.into_iter().map(|r| r.image_id));
    }
    assert_eq!(walked, ids);

    let mut streamed = Vec::new();
    db.for_each_result("b-1", |r| {
        streamed.push(r.image_id);
        Ok::<_, facepipe_ledger::DbError>(())
    })
    .await
    .unwrap();
    assert_eq!(streamed, ids);
    // The callback's error stops the stream and comes back as it was.
    let stopped = db.for_each_result("b-1", |_| Err(facepipe_ledger::DbError::Config("stop".into()))).await;
    assert!(matches!(stopped, Err(facepipe_ledger::DbError::Config(m)) if m == "stop"));
}

#[tokio::test]
async fn the_sweeper_sees_only_completed_batches_and_final_originals() {
    use facepipe_ledger::ObjectKind;
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    db.insert_batch("b-1", &job("proj", "uploads/b-1.zip"), "uploads/b-1.zip").await.unwrap();
    db.insert_images("b-1", &[image("0000000"), image("0000001"), image("0000002")]).await.unwrap();
    db.finish_ingest("b-1", 3, &[]).await.unwrap();
    db.record_outcome(&outcome("0000000", ImageStatus::Cropped)).await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert!(db.batches_to_sweep(ObjectKind::Originals, later, 10).await.unwrap().is_empty(), "in flight");
    db.record_outcome(&outcome("0000001", ImageStatus::NoFace)).await.unwrap();
    let failed = Outcome::failed(outcome("0000002", ImageStatus::Failed).image, StageName::Detect, "bad".into(), 1);
    assert!(db.record_outcome(&failed).await.unwrap().completed_batch);

    let now = chrono::Utc::now();
    assert!(db.batches_to_sweep(ObjectKind::Originals, now - chrono::Duration::hours(1), 10).await.unwrap().is_empty(), "not old enough");
    assert_eq!(db.batches_to_sweep(ObjectKind::Originals, later, 10).await.unwrap(), ["b-1"]);
    let finals = db.final_originals("b-1", "", 10).await.unwrap();
    assert_eq!(finals.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["0000000", "0000001"], "the failed image's original stays");
    assert_eq!(db.final_originals("b-1", "0000000", 10).await.unwrap().len(), 1);

    db.mark_swept("b-1", ObjectKind::Originals, chrono::Utc::now()).await.unwrap();
    assert!(db.batches_to_sweep(ObjectKind::Originals, later, 10).await.unwrap().is_empty(), "swept");
    assert_eq!(db.batches_to_sweep(ObjectKind::Crops, later, 10).await.unwrap(), ["b-1"], "each kind on its own");
    // A replay reopens and completes the batch again: it is due for another sweep.
    assert!(db.reopen_image("b-1", "0000002").await.unwrap());
    assert!(db.record_outcome(&outcome("0000002", ImageStatus::NoFace)).await.unwrap().completed_batch);
    assert_eq!(db.batches_to_sweep(ObjectKind::Originals, later, 10).await.unwrap(), ["b-1"]);

    // One sweeper at a time.
    let lock = db.try_lock(facepipe_ledger::SWEEP_LOCK).await.unwrap().expect("free");
    assert!(db.try_lock(facepipe_ledger::SWEEP_LOCK).await.unwrap().is_none());
    drop(lock);
    let mut again = None;
    for _ in 0..50 {
        again = db.try_lock(facepipe_ledger::SWEEP_LOCK).await.unwrap();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "released when its holder drops it");
}

#[tokio::test]
async fn concurrent_outcomes_and_their_redeliveries_complete_the_batch_exactly_once() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    let ids: Vec<String> = (0..200).map(|n| format!("{n:07}")).collect();
    db.insert_batch("b-1", &job("proj", "x.zip"), "x.zip").await.unwrap();
    db.insert_images("b-1", &ids.iter().map(|id| image(id)).collect::<Vec<_>>()).await.unwrap();
    assert!(!db.finish_ingest("b-1", ids.len(), &[]).await.unwrap());
    // Every outcome twice, as two workers holding a redelivered message would, all at once.
    let tasks: Vec<_> = ids
        .iter()
        .chain(ids.iter().rev())
        .enumerate()
        .map(|(n, id)| {
            let (db, id) = (db.clone(), id.clone());
            let status = if n % 10 == 3 { ImageStatus::NoFace } else { ImageStatus::Cropped };
            tokio::spawn(async move { db.record_outcome(&outcome(&id, status)).await.unwrap() })
        })
        .collect();
    let mut recorded = Vec::new();
    for t in tasks {
        recorded.push(t.await.unwrap());
    }
    assert_eq!(recorded.iter().filter(|r| r.first).count(), ids.len(), "each image counted once");
    assert_eq!(recorded.iter().filter(|r| r.completed_batch).count(), 1, "completed exactly once");
    let last = recorded.iter().find(|r| r.completed_batch).unwrap().progress.clone().unwrap();
    assert_eq!((last.processed, last.image_count, last.completed), (200, Some(200), true));
    let mut seen: Vec<i32> = recorded.iter().filter_map(|r| r.progress.as_ref().map(|p| p.processed)).collect();
    seen.sort();
    assert_eq!(seen, (1..=200).collect::<Vec<i32>>(), "every count from 1 to 200 reported once");
    let s = db.batch_status("b-1").await.unwrap().unwrap();
    assert_eq!((s.status, s.processed, s.failed, s.faces), (BatchStatus::Completed, 200, 0, 200));
}

/// One statement records a group: several batches, an image twice (the first of the
/// group wins), an image that was already recorded, an unknown image (its error alone),
/// and the group that brings a batch to its count completes it; each batch's counters
/// move once, and its progress goes with one outcome of the group.
#[tokio::test]
async fn a_group_of_outcomes_is_recorded_in_one_statement_as_one_at_a_time_would() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    for batch in ["b-1", "b-2"] {
        db.insert_batch(batch, &job("proj", "x.zip"), "x.zip").await.unwrap();
        db.insert_images(batch, &[image("0000000"), image("0000001"), image("0000002")]).await.unwrap();
        assert!(!db.finish_ingest(batch, 3, &[]).await.unwrap());
    }
    let of = |batch: &str, id: &str, status| Outcome { image: ImageRef::new(batch, id, Priority::DEFAULT), ..outcome(id, status) };
    db.record_outcome(&of("b-2", "0000002", ImageStatus::NoFace)).await.unwrap();

    let group = [
        of("b-1", "0000000", ImageStatus::Cropped),
        of("b-1", "0000000", ImageStatus::NoFace), // a redelivery within the group
        of("b-1", "0000001", ImageStatus::Cropped),
        of("b-1", "0000002", ImageStatus::Failed),
        of("b-2", "0000000", ImageStatus::Cropped),
        of("b-2", "0000002", ImageStatus::Cropped), // already recorded
        of("b-2", "9999999", ImageStatus::Cropped), // never registered
    ];
    let results = db.record_outcomes(&group.iter().collect::<Vec<_>>()).await.unwrap();
    let first: Vec<Option<bool>> = results.iter().map(|r| r.as_ref().ok().map(|r| r.first)).collect();
    assert_eq!(first, [Some(true), Some(false), Some(true), Some(true), Some(true), Some(false), None]);
    assert!(matches!(results[6], Err(facepipe_ledger::DbError::UnknownImage { .. })));
    // b-1 reached its count in this group: completed, said once, by its last claimed outcome.
    let completed: Vec<bool> = results.iter().map(|r| r.as_ref().is_ok_and(|r| r.completed_batch)).collect();
    assert_eq!(completed, [false, false, false, true, false, false, false]);
    let progress: Vec<(usize, i32)> =
        results.iter().enumerate().filter_map(|(n, r)| Some((n, r.as_ref().ok()?.progress.as_ref()?.processed))).collect();
    assert_eq!(progress, [(3, 3), (4, 2)], "one progress per batch, on its last claimed outcome");

    let b1 = db.batch_status("b-1").await.unwrap().unwrap();
    assert_eq!((b1.status, b1.processed, b1.failed, b1.faces), (BatchStatus::Completed, 3, 1, 3));
    let b2 = db.batch_status("b-2").await.unwrap().unwrap();
    assert_eq!((b2.status, b2.processed, b2.failed, b2.faces), (BatchStatus::Processing, 2, 0, 2));
    let rows = db.results("b-1").await.unwrap();
    assert_eq!(rows[0].status, ImageStatus::Cropped, "the group's first outcome for an image wins");
    assert_eq!(rows[0].crop_keys, vec!["batches/b-1/crops/0000000-0.jpg"]);
}
