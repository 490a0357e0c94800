//! What extract writes: batches and their images, registered as `pending` (existing
//! rows left alone, so a resumed ingest registers nothing twice). Outcomes are
//! recorded in [`crate::outcomes`].

use facepipe_core::messages::ExtractJob;

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
