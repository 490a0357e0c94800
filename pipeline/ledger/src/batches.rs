//! A batch's state as operators read it (`pipeline status`, the API), and the
//! replay of a failure (a failed image or batch reopened).

use serde::Serialize;

use facepipe_core::domain::{BatchStatus, Priority, StageName};

use crate::error::DbError;
use crate::pool::Db;

/// Progress of one batch, as `pipeline status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchSummary {
    /// Batch id.
    pub batch_id: String,
    /// Owner.
    pub project_id: String,
    /// 1-10.
    pub priority: Priority,
    /// Where the batch is.
    pub status: BatchStatus,
    /// Images in the archive, once known.
    pub image_count: Option<i32>,
    /// Images with a terminal outcome.
    pub processed: i32,
    /// Of those, failed ones.
    pub failed: i32,
    /// Faces found so far.
    pub faces: i32,
    /// Archive entries that were not images.
    pub skipped: i32,
    /// Share of images processed, 0-100 (0 while the count is unknown).
    pub progress_percent: f64,
    /// Why the batch failed, when it did.
    pub error: Option<String>,
    /// When the batch was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When its last image was recorded.
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When its row last changed (an outcome recorded, a state change).
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// Since when images of it are pending with nothing of it left in any stream (the
    /// broker lost their messages); the reconciler re-drives them once it stays so
    /// for `reconcile.stalled_after`. None while it flows or waits behind a backlog.
    pub stalled_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Images the reconciler published again, in all.
    pub redriven: i32,
}

impl BatchSummary {
    /// The columns [`BatchSummary::from_row`] reads, in its order.
    pub const COLUMNS: &str = "batch_id, project_id, priority, status, image_count, processed, failed,
     faces, skipped_count, error, created_at, completed_at, updated_at, stalled_at, redriven";

    /// A batch row, selected with [`BatchSummary::COLUMNS`].
    pub fn from_row(r: &tokio_postgres::Row) -> Result<Self, DbError> {
        let image_count: Option<i32> = r.get(4);
        let processed: i32 = r.get(5);
        let progress_percent = match image_count {
            Some(0) => 100.0,
            Some(n) => (processed as f64 * 100.0 / n as f64).min(100.0),
            None => 0.0,
        };
        Ok(BatchSummary {
            batch_id: r.get(0),
            project_id: r.get(1),
            priority: Priority::new(r.get::<_, i16>(2).into())?,
            status: r.get::<_, &str>(3).parse()?,
            image_count,
            processed,
            failed: r.get(6),
            faces: r.get(7),
            skipped: r.get(8),
            progress_percent,
            error: r.get(9),
            created_at: r.get(10),
            completed_at: r.get(11),
            updated_at: r.get(12),
            stalled_since: r.get(13),
            redriven: r.get(14),
        })
    }
}

impl Db {
    /// A batch's progress, or `None` when it does not exist.
    pub async fn batch_status(&self, batch_id: &str) -> Result<Option<BatchSummary>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(&format!("SELECT {} FROM batches WHERE batch_id = $1", BatchSummary::COLUMNS), &[&batch_id])
            .await?;
        row.as_ref().map(BatchSummary::from_row).transpose()
    }

    /// Images that failed, per stage that gave up on them, over all batches (failures
    /// recorded before stages were named are left out).
    pub async fn failed_by_stage(&self) -> Result<std::collections::BTreeMap<StageName, i64>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query("SELECT failed_stage, count(*) FROM images WHERE status = 'failed' AND failed_stage IS NOT NULL GROUP BY 1", &[])
            .await?;
        rows.iter().map(|r| Ok((r.get::<_, &str>(0).parse()?, r.get(1)))).collect()
    }

    /// Returns a failed image to `pending` (and its batch to `processing`) so a
    /// replayed message can record a new outcome. True when the image was failed.
    pub async fn reopen_image(&self, batch_id: &str, image_id: &str) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let reopened = tx
            .execute(
                "UPDATE images SET status = 'pending', error = NULL, failed_stage = NULL, updated_at = now()
                 WHERE batch_id = $1 AND image_id = $2 AND status = 'failed'",
                &[&batch_id, &image_id],
            )
            .await?;
        if reopened == 1 {
            tx.execute(
                "UPDATE batches SET processed = processed - 1, failed = failed - 1, updated_at = now(),
                        completed_at = NULL,
                        status = CASE WHEN status = 'completed' THEN 'processing' ELSE status END
                 WHERE batch_id = $1",
                &[&batch_id],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(reopened == 1)
    }

    /// Returns a failed batch to `ingesting` so a replayed extract job can read it again.
    pub async fn reopen_batch(&self, batch_id: &str) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE batches SET status = 'ingesting', error = NULL, completed_at = NULL, updated_at = now()
                 WHERE batch_id = $1 AND status = 'failed'",
                &[&batch_id],
            )
            .await?;
        Ok(n == 1)
    }
}
