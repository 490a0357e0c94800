//! What the reconciler asks and tells the ledger: the batches still running, their
//! pending images a page at a time, and what it marked and re-drove. Every read is a
//! keyed page on an index, so a million pending images cost a seek per page.

use facepipe_core::domain::{BatchStatus, Priority};
use facepipe_core::messages::ExtractJob;

use crate::error::DbError;
use crate::pool::Db;

/// A batch still being ingested or processed, as the reconciler sees it.
#[derive(Debug, Clone)]
pub struct ActiveBatch {
    /// Its id.
    pub batch_id: String,
    /// Ingesting or processing.
    pub status: BatchStatus,
    /// Its priority (the band of every message).
    pub priority: Priority,
    /// Images without an outcome yet (0 while the image count is unknown).
    pub pending: i64,
    /// When its row last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// When the reconciler first found it stalled, if it did.
    pub stalled_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A pending image, with what the reconciler needs to send it again.
#[derive(Debug, Clone)]
pub struct PendingImage {
    /// Its id.
    pub image_id: String,
    /// Its original, for a detect job; none for an entry extract could not read.
    pub original_key: Option<String>,
    /// Why its entry could not be read, when it could not.
    pub error: Option<String>,
}

impl Db {
    /// Up to `limit` batches still ingesting or processing, after `after` in id order.
    pub async fn active_batches(&self, after: &str, limit: i64) -> Result<Vec<ActiveBatch>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT batch_id, status, priority, COALESCE(image_count - processed, 0), updated_at, stalled_at FROM batches
                 WHERE status IN ('ingesting', 'processing') AND batch_id > $1 ORDER BY batch_id LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ActiveBatch {
                    batch_id: r.get(0),
                    status: r.get::<_, &str>(1).parse()?,
                    priority: Priority::new(r.get::<_, i16>(2).into())?,
                    pending: i64::from(r.get::<_, i32>(3)),
                    updated_at: r.get(4),
                    stalled_at: r.get(5),
                })
            })
            .collect()
    }

    /// Marks a batch stalled (keeping the first time it was found so), without
    /// touching `updated_at`: finding it stalled is no progress.
    pub async fn mark_stalled(&self, batch_id: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.execute("UPDATE batches SET stalled_at = COALESCE(stalled_at, now()) WHERE batch_id = $1", &[&batch_id]).await?;
        Ok(())
    }

    /// Clears a batch's stalled mark (its messages are in the streams again).
    pub async fn clear_stalled(&self, batch_id: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.execute("UPDATE batches SET stalled_at = NULL WHERE batch_id = $1 AND stalled_at IS NOT NULL", &[&batch_id]).await?;
        Ok(())
    }

    /// Up to `limit` pending images of a batch after image `after`, in image order.
    pub async fn pending_images(&self, batch_id: &str, after: &str, limit: i64) -> Result<Vec<PendingImage>, DbError> {
        let mut client = self.pool.get().await?;
        let rows = crate::results::ordered_page(
            &mut client,
            "SELECT image_id, original_key, error FROM images
             WHERE batch_id = $1 AND status = 'pending' AND image_id > $2 ORDER BY image_id LIMIT $3",
            &[&batch_id, &after, &limit],
        )
        .await?;
        Ok(rows.into_iter().map(|r| PendingImage { image_id: r.get(0), original_key: r.get(1), error: r.get(2) }).collect())
    }

    /// Counts a re-drive of each of `image_ids` that is still pending; returns each one's
    /// new re-drive count (the generation its messages' ids carry). The batch counts them too.
    pub async fn count_redrives(&self, batch_id: &str, image_ids: &[&str]) -> Result<Vec<(String, u32)>, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "UPDATE images SET redrives = redrives + 1 WHERE batch_id = $1 AND image_id = ANY($2) AND status = 'pending'
                 RETURNING image_id, redrives",
                &[&batch_id, &image_ids],
            )
            .await?;
        tx.execute("UPDATE batches SET redriven = redriven + $2 WHERE batch_id = $1", &[&batch_id, &(rows.len() as i32)]).await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get::<_, i32>(1) as u32)).collect())
    }

    /// The batch's extract job with its re-drive count raised by one, to publish
    /// again; none when no job was recorded with the batch.
    pub async fn redrive_job(&self, batch_id: &str) -> Result<Option<ExtractJob>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "UPDATE batches SET redrives = redrives + 1 WHERE batch_id = $1 AND job IS NOT NULL RETURNING job, redrives",
                &[&batch_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut job: ExtractJob = serde_json::from_value(row.get(0)).map_err(|e| DbError::Stored(format!("the job of batch {batch_id}: {e}")))?;
        job.redrive = row.get::<_, i32>(1) as u32;
        Ok(Some(job))
    }
}
