//! Outcome recording against a real PostgreSQL: idempotent upserts, counters
//! that cannot double count, and a batch that completes exactly once.

mod support;

use facepipe_core::domain::{Detector, Priority, StageName};
use facepipe_runtime::db::{Db, NewImage, Recorded};
use facepipe_core::messages::{FaceBox, ImageRef, ImageStatus, Outcome};
use support::TestDb;

fn outcome(image_id: &str, status: ImageStatus) -> Outcome {
    Outcome {
        image: ImageRef { batch_id: "b-1".into(), image_id: image_id.into(), priority: Priority::DEFAULT },
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
    }
}

#[tokio::test]
async fn same_outcome_twice_leaves_one_row_and_unchanged_counters() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    assert!(db.migrate().await.unwrap().is_empty(), "migrations run once");

    db.insert_batch("b-1", "proj", Priority::DEFAULT, "uploads/b-1.zip").await.unwrap();
    db.insert_batch("b-1", "proj", Priority::DEFAULT, "uploads/b-1.zip").await.unwrap();
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
    assert_eq!(s.status, "processing");
    assert_eq!(s.progress_percent, 50.0);

    // The last image completes the batch, exactly once.
    let last = db.record_outcome(&outcome("0000001", ImageStatus::NoFace)).await.unwrap();
    assert!(last.first && last.completed_batch && last.progress.unwrap().completed);
    let replay = db.record_outcome(&outcome("0000001", ImageStatus::NoFace)).await.unwrap();
    assert_eq!(replay, Recorded { first: false, completed_batch: false, progress: None });
    let s = db.batch_status("b-1").await.unwrap().unwrap();
    assert_eq!((s.status.as_str(), s.processed, s.failed), ("completed", 2, 0));
    assert!(s.completed_at.is_some());

    let rows = db.results("b-1").await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].status, "cropped");
    assert_eq!(rows[0].faces.len(), 1);
    assert_eq!(rows[0].crop_keys, vec!["batches/b-1/crops/0000000-0.jpg"]);
}

#[tokio::test]
async fn unknown_images_are_permanent_errors_and_empty_batches_complete() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    let err = db.record_outcome(&outcome("0000009", ImageStatus::Cropped)).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");

    db.insert_batch("b-1", "proj", Priority::DEFAULT, "empty.zip").await.unwrap();
    assert!(db.finish_ingest("b-1", 0, &[]).await.unwrap(), "an empty archive completes at once");
    assert!(!db.finish_ingest("b-1", 0, &[]).await.unwrap(), "and only once");
    assert_eq!(db.batch_status("b-1").await.unwrap().unwrap().status, "completed");
}

#[tokio::test]
async fn batch_completes_when_ingest_finishes_after_the_last_outcome() {
    let test_db = TestDb::create().await;
    let db = test_db.pool().await;
    db.insert_batch("b-1", "proj", Priority::DEFAULT, "x.zip").await.unwrap();
    db.insert_images("b-1", &[image("0000000")]).await.unwrap();
    // persist can record an image before extract has finished reading the archive.
    assert!(!db.record_outcome(&outcome("0000000", ImageStatus::Cropped)).await.unwrap().completed_batch);
    assert_eq!(db.batch_status("b-1").await.unwrap().unwrap().status, "ingesting");
    assert!(db.finish_ingest("b-1", 1, &[]).await.unwrap());
    assert_eq!(db.batch_status("b-1").await.unwrap().unwrap().status, "completed");
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() {
    let test_db = TestDb::create().await;
    let db = Db::connect(&test_db.url, 8).unwrap();
    let runs = futures::future::join_all((0..4).map(|_| db.migrate())).await;
    let mut applied: Vec<i32> = runs.into_iter().flat_map(|r| r.unwrap()).collect();
    applied.sort();
    assert_eq!(applied, [1, 2], "every migration once, whichever process ran it");
    let history = test_db.client().await.query("SELECT version FROM refinery_schema_history ORDER BY version", &[]).await.unwrap();
    assert_eq!(history.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), [1, 2]);
}

#[tokio::test]
async fn a_database_migrated_by_the_earlier_runner_is_adopted_without_running_anything_again() {
    let test_db = TestDb::create().await;
    // What the pipeline's own runner left behind: the schema, and its versions in `schema_migrations`.
    let client = test_db.client().await;
    client.batch_execute(include_str!("../runtime/migrations/V1__batches_and_images.sql")).await.unwrap();
    client.batch_execute(include_str!("../runtime/migrations/V2__record_ids.sql")).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations (version) VALUES (1), (2);
             INSERT INTO batches (batch_id, project_id, source) VALUES ('kept', 'p', 'uploads/kept.zip');",
        )
        .await
        .unwrap();

    let db = Db::connect(&test_db.url, 2).unwrap();
    assert!(db.migrate().await.unwrap().is_empty(), "an adopted migration does not run again");
    assert!(db.migrate().await.unwrap().is_empty());
    let legacy = client.query_one("SELECT to_regclass('schema_migrations') IS NULL", &[]).await.unwrap();
    assert!(legacy.get::<_, bool>(0), "the old table is gone once adopted");
    let history = client.query("SELECT version FROM refinery_schema_history ORDER BY version", &[]).await.unwrap();
    assert_eq!(history.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), [1, 2]);
    assert!(db.batch_status("kept").await.unwrap().is_some(), "the data is untouched");
}
