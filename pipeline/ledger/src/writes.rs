//! What the stages write: batches and images registered by extract, outcomes
//! recorded by persist. Idempotency lives here: images are inserted as `pending`
//! and leave `pending` exactly once (the first outcome wins); the batch counters
//! move in the same statement, so redelivered outcomes change nothing, and a batch
//! flips to `completed` by a conditional update that succeeds only once.

use serde::Serialize;

use facepipe_core::domain::{Detector, ImageStatus, StageName};
use facepipe_core::messages::{ExtractJob, Outcome};

use crate::error::DbError;
use crate::pool::Db;

/// A newly registered image.
#[derive(Debug, Clone)]
pub struct NewImage {
    /// Image id.
    pub image_id: String,
    /// ZIP entry name, or the image's URL.
    pub entry_name: String,
    /// Original object key; empty for an entry that could not be read.
    pub original_key: String,
    /// The caller's id for an image given by URL.
    pub record_id: Option<String>,
    /// Why the entry cannot be read (none for an image to process): kept with the image
    /// while its failure travels to persist, so the reconciler can record it should that
    /// message be lost.
    pub error: Option<String>,
}

/// What recording an outcome changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// False when the image already had an outcome (a redelivery): nothing changed.
    pub first: bool,
    /// True when this outcome completed its batch.
    pub completed_batch: bool,
    /// The batch's counters right after this outcome (absent when nothing changed).
    pub progress: Option<Progress>,
}

/// A batch's progress event, published on `<progress_subject>.<batch>` by persist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Progress {
    /// Batch id.
    pub batch_id: String,
    /// Images with an outcome.
    pub processed: i32,
    /// Of those, failed.
    pub failed: i32,
    /// Images in the archive, once extract has read it all.
    pub image_count: Option<i32>,
    /// True on the event that completed the batch.
    pub completed: bool,
}

impl Db {
    /// Registers a batch (no-op when it exists) with the job that makes it, so the
    /// reconciler can publish the job again should the broker lose it.
    pub async fn insert_batch(&self, batch_id: &str, job: &ExtractJob, source: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        let stored = serde_json::to_value(ExtractJob { batch_id: Some(batch_id.to_string()), redrive: 0, ..job.clone() }).expect("a job serializes");
        client
            .execute(
                "INSERT INTO batches (batch_id, project_id, priority, source, job)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING",
                &[&batch_id, &job.project_id, &i16::from(job.priority.get()), &source, &stored],
            )
            .await?;
        Ok(())
    }

    /// Which of `image_ids` of a batch already have their outcome: a resumed extract
    /// does not send them through the stages again.
    pub async fn final_among(&self, batch_id: &str, image_ids: &[&str]) -> Result<std::collections::HashSet<String>, DbError> {
        if image_ids.is_empty() {
            return Ok(Default::default());
        }
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT image_id FROM images WHERE batch_id = $1 AND image_id = ANY($2) AND status <> 'pending'",
                &[&batch_id, &image_ids],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Registers images as `pending` (existing rows are left alone).
    pub async fn insert_images(&self, batch_id: &str, images: &[NewImage]) -> Result<(), DbError> {
        if images.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = images.iter().map(|i| i.image_id.as_str()).collect();
        let names: Vec<&str> = images.iter().map(|i| i.entry_name.as_str()).collect();
        let keys: Vec<&str> = images.iter().map(|i| i.original_key.as_str()).collect();
        let records: Vec<Option<&str>> = images.iter().map(|i| i.record_id.as_deref()).collect();
        let errors: Vec<Option<&str>> = images.iter().map(|i| i.error.as_deref()).collect();
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO images (batch_id, image_id, entry_name, original_key, record_id, error)
                 SELECT $1, id, name, NULLIF(key, ''), record, error
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS t(id, name, key, record, error)
                 ON CONFLICT (batch_id, image_id) DO NOTHING",
                &[&batch_id, &ids, &names, &keys, &records, &errors],
            )
            .await?;
        Ok(())
    }

    /// Marks the archive fully read: the image count is now known. Returns true when
    /// this also completed the batch (every image already had an outcome, or none exist).
    pub async fn finish_ingest(
        &self,
        batch_id: &str,
        image_count: usize,
        skipped: &[String],
    ) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE batches SET image_count = $2, skipped_count = $3, skipped_entries = $4,
                    status = 'processing', updated_at = now()
             WHERE batch_id = $1 AND status = 'ingesting'",
            &[&batch_id, &(image_count as i32), &(skipped.len() as i32), &serde_json::json!(skipped)],
        )
        .await?;
        let completed = try_complete(&tx, batch_id).await?;
        tx.commit().await?;
        Ok(completed)
    }

    /// Marks a batch failed as a whole (its archive could not be read).
    pub async fn fail_batch(&self, batch_id: &str, error: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE batches SET status = 'failed', error = $2, updated_at = now(), completed_at = now()
                 WHERE batch_id = $1 AND status IN ('ingesting', 'processing')",
                &[&batch_id, &error],
            )
            .await?;
        Ok(())
    }

    /// Records an image's outcome. Only the first outcome for an image counts.
    pub async fn record_outcome(&self, outcome: &Outcome) -> Result<Recorded, DbError> {
        // One statement, so one round trip and one implicit transaction instead of
        // five: the image's row is claimed (only while pending, so a redelivery
        // changes nothing), and only then the batch's counters move and, when this
        // was its last image, the batch completes. The batch's row lock orders
        // outcomes of one batch, so exactly one of them sees the count reach
        // `image_count` in a `processing` batch: that one completes it.
        let client = self.pool.get().await?;
        let image = &outcome.image;
        let faces = serde_json::to_value(&outcome.faces).expect("faces serialize");
        // Prepared once per connection: a parse is a round trip of its own.
        let statement = client
            .prepare_cached(
                "WITH claimed AS (
                     UPDATE images SET status = $3, width = $4, height = $5, faces = $6, crop_keys = $7,
                            detector = $8, error = $9, failed_stage = $10, attempts = $11, updated_at = now()
                     WHERE batch_id = $1 AND image_id = $2 AND status = 'pending'
                     RETURNING 1
                 ), counted AS (
                     UPDATE batches SET processed = processed + 1, failed = failed + $12, faces = faces + $13,
                            updated_at = now(),
                            completed_at = CASE WHEN status = 'processing' AND processed + 1 >= image_count
                                                THEN now() ELSE completed_at END,
                            status = CASE WHEN status = 'processing' AND processed + 1 >= image_count
                                          THEN 'completed' ELSE status END
                     WHERE batch_id = $1 AND EXISTS (SELECT 1 FROM claimed)
                     RETURNING processed, failed, image_count,
                               COALESCE(status = 'completed' AND processed = image_count, false)
                 )
                 SELECT EXISTS (SELECT 1 FROM claimed),
                        EXISTS (SELECT 1 FROM images WHERE batch_id = $1 AND image_id = $2),
                        counted.*
                 FROM (SELECT 1) AS one LEFT JOIN counted ON true",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &image.batch_id,
                    &image.image_id,
                    &outcome.status.as_str(),
                    &outcome.width.map(|v| v as i32),
                    &outcome.height.map(|v| v as i32),
                    &faces,
                    &outcome.crop_keys,
                    &outcome.detector.map(Detector::as_str),
                    &outcome.error,
                    &outcome.failed_stage.map(StageName::as_str),
                    &(outcome.attempts as i32),
                    &i32::from(outcome.status == ImageStatus::Failed),
                    &(outcome.faces.len() as i32),
                ],
            )
            .await?;
        let (claimed, exists): (bool, bool) = (row.get(0), row.get(1));
        if !claimed {
            return if exists {
                Ok(Recorded { first: false, completed_batch: false, progress: None })
            } else {
                Err(DbError::UnknownImage { batch_id: image.batch_id.clone(), image_id: image.image_id.clone() })
            };
        }
        // Claimed but no batch row: the batch was deleted under it; nothing to count.
        let Some(processed) = row.get::<_, Option<i32>>(2) else {
            return Ok(Recorded { first: true, completed_batch: false, progress: None });
        };
        let completed_batch: bool = row.get(5);
        let progress = Progress {
            batch_id: image.batch_id.clone(),
            processed,
            failed: row.get(3),
            image_count: row.get(4),
            completed: completed_batch,
        };
        Ok(Recorded { first: true, completed_batch, progress: Some(progress) })
    }
}

/// Flips a batch to `completed` when every image has an outcome; true only for the call that flipped it.
async fn try_complete(tx: &deadpool_postgres::Transaction<'_>, batch_id: &str) -> Result<bool, DbError> {
    let flipped = tx
        .execute(
            "UPDATE batches SET status = 'completed', completed_at = now(), updated_at = now()
             WHERE batch_id = $1 AND status = 'processing' AND processed >= image_count",
            &[&batch_id],
        )
        .await?;
    Ok(flipped == 1)
}
