//! What the retention sweeper asks PostgreSQL: which completed batches have
//! objects to delete, which originals are no longer needed, and what it swept.

use crate::error::DbError;
use crate::pool::Db;

/// A kind of object the sweeper deletes, each with its own retention period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// `uploads/<batch>.zip`.
    Upload,
    /// `batches/<batch>/originals/*` of images with a final outcome.
    Originals,
    /// `batches/<batch>/crops/*`.
    Crops,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 3] = [ObjectKind::Upload, ObjectKind::Originals, ObjectKind::Crops];

    /// Name in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Upload => "uploads",
            ObjectKind::Originals => "originals",
            ObjectKind::Crops => "crops",
        }
    }

    fn swept_column(self) -> &'static str {
        match self {
            ObjectKind::Upload => "upload_swept_at",
            ObjectKind::Originals => "originals_swept_at",
            ObjectKind::Crops => "crops_swept_at",
        }
    }
}

/// Key of the advisory lock that keeps two sweepers from working at once.
pub const SWEEP_LOCK: i64 = 0x6661_6365_7377_6570; // "facesweep"

impl Db {
    /// Completed batches whose `kind` objects have not been swept since they
    /// completed, and that completed before `completed_before`; oldest first, at most `limit`.
    pub async fn batches_to_sweep(
        &self,
        kind: ObjectKind,
        completed_before: chrono::DateTime<chrono::Utc>,
        limit: i64,
    ) -> Result<Vec<String>, DbError> {
        let client = self.pool.get().await?;
        let column = kind.swept_column();
        let rows = client
            .query(
                &format!(
                    "SELECT batch_id FROM batches
                     WHERE status = 'completed' AND completed_at < $1
                       AND ({column} IS NULL OR {column} < completed_at)
                     ORDER BY completed_at LIMIT $2"
                ),
                &[&completed_before, &limit],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Up to `limit` (image id, original key) pairs of a batch's images whose outcome
    /// is final (cropped or no face) after image `after`: originals nothing will read
    /// again. Failed and pending images are never listed.
    pub async fn final_originals(&self, batch_id: &str, after: &str, limit: i64) -> Result<Vec<(String, String)>, DbError> {
        let mut client = self.pool.get().await?;
        // Keyed pages through a whole batch: walked in index order, as results' pages are.
        let rows = crate::results::ordered_page(
            &mut client,
            "SELECT image_id, original_key FROM images
             WHERE batch_id = $1 AND image_id > $2 AND status IN ('cropped', 'no_face')
               AND original_key IS NOT NULL
             ORDER BY image_id LIMIT $3",
            &[&batch_id, &after, &limit],
        )
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Records that a batch's `kind` objects were swept by a sweep that started at
    /// `started`; a batch completed again after that is swept again.
    pub async fn mark_swept(
        &self,
        batch_id: &str,
        kind: ObjectKind,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                &format!("UPDATE batches SET {} = $2 WHERE batch_id = $1", kind.swept_column()),
                &[&batch_id, &started],
            )
            .await?;
        Ok(())
    }
}
