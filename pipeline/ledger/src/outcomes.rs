//! Outcomes recorded, in groups: the images' rows claimed (only while `pending`, so
//! the first outcome wins and a redelivery changes nothing), then each batch's counters
//! moved once for the whole group, and a batch whose count reaches its image count
//! completed by the same conditional update, which succeeds once. One statement, one
//! round trip and one commit, however many outcomes: persist groups what arrives while
//! its previous group commits.

use serde::Serialize;

use facepipe_core::domain::{Detector, StageName};
use facepipe_core::messages::Outcome;

use crate::error::DbError;
use crate::pool::Db;

/// What recording an outcome changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// False when the image already had an outcome (a redelivery): nothing changed.
    pub first: bool,
    /// True when this outcome's group completed its batch (one outcome of the group says so).
    pub completed_batch: bool,
    /// The batch's counters right after this outcome's group, on one outcome per batch
    /// of the group (absent on the others, and when nothing changed).
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

/// One outcome as the statement reads it (`jsonb_to_recordset`).
#[derive(Serialize)]
struct Row<'a> {
    n: usize,
    batch_id: &'a str,
    image_id: &'a str,
    status: &'a str,
    width: Option<u32>,
    height: Option<u32>,
    faces: &'a [facepipe_core::messages::FaceBox],
    crop_keys: &'a [String],
    detector: Option<&'a str>,
    error: Option<&'a str>,
    failed_stage: Option<&'a str>,
    attempts: u32,
}

/// The rows claimed, each batch's counters after the group, and which outcomes name an
/// image that exists.
const RECORD_GROUP: &str = "
WITH input AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS t(
        n int, batch_id text, image_id text, status text, width int, height int, faces jsonb,
        crop_keys text[], detector text, error text, failed_stage text, attempts int)
), claimed AS (
    UPDATE images i SET status = t.status, width = t.width, height = t.height, faces = t.faces,
           crop_keys = t.crop_keys, detector = t.detector, error = t.error, failed_stage = t.failed_stage,
           attempts = t.attempts, updated_at = now()
    FROM input t
    WHERE i.batch_id = t.batch_id AND i.image_id = t.image_id AND i.status = 'pending'
    RETURNING t.n, t.batch_id, (t.status = 'failed')::int AS failed, jsonb_array_length(t.faces) AS faces
), per_batch AS (
    SELECT batch_id, count(*)::int AS n, sum(failed)::int AS failed, sum(faces)::int AS faces
    FROM claimed GROUP BY batch_id
), counted AS (
    UPDATE batches b SET processed = b.processed + p.n, failed = b.failed + p.failed, faces = b.faces + p.faces,
           updated_at = now(),
           completed_at = CASE WHEN b.status = 'processing' AND b.processed + p.n >= b.image_count
                               THEN now() ELSE b.completed_at END,
           status = CASE WHEN b.status = 'processing' AND b.processed + p.n >= b.image_count
                         THEN 'completed' ELSE b.status END
    FROM per_batch p
    WHERE b.batch_id = p.batch_id
    RETURNING b.batch_id, b.processed, b.failed, b.image_count,
              b.status = 'completed' AND b.processed = b.image_count AS completed
)
SELECT 'claimed' AS kind, n, NULL::text AS batch_id, NULL::int AS processed, NULL::int AS failed,
       NULL::int AS image_count, NULL::bool AS completed
FROM claimed
UNION ALL
SELECT 'exists', t.n, NULL, NULL, NULL, NULL, NULL
FROM input t WHERE EXISTS (SELECT 1 FROM images i WHERE i.batch_id = t.batch_id AND i.image_id = t.image_id)
UNION ALL
SELECT 'batch', NULL, batch_id, processed, failed, image_count, completed FROM counted";

impl Db {
    /// Records an image's outcome. Only the first outcome for an image counts.
    pub async fn record_outcome(&self, outcome: &Outcome) -> Result<Recorded, DbError> {
        let mut recorded = self.record_outcomes(&[outcome]).await?;
        recorded.pop().expect("one result per outcome")
    }

    /// Records a group of outcomes in one statement; one result per outcome, in order:
    /// what it changed, or [`DbError::UnknownImage`]. Only the first outcome for an image
    /// counts, also within the group. `Err` when the statement failed: nothing of the
    /// group was recorded.
    pub async fn record_outcomes(&self, outcomes: &[&Outcome]) -> Result<Vec<Result<Recorded, DbError>>, DbError> {
        // Within the group, an image's later outcomes are redeliveries of the first.
        let mut seen = std::collections::HashSet::new();
        let rows: Vec<Row> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| seen.insert((o.image.batch_id.as_str(), o.image.image_id.as_str())))
            .map(|(n, o)| Row {
                n,
                batch_id: &o.image.batch_id,
                image_id: &o.image.image_id,
                status: o.status.as_str(),
                width: o.width,
                height: o.height,
                faces: &o.faces,
                crop_keys: &o.crop_keys,
                detector: o.detector.map(Detector::as_str),
                error: o.error.as_deref(),
                failed_stage: o.failed_stage.map(StageName::as_str),
                attempts: o.attempts,
            })
            .collect();
        let input = serde_json::to_value(&rows).expect("outcomes serialize");
        let client = self.pool.get().await?;
        // Prepared once per connection: a parse is a round trip of its own.
        let statement = client.prepare_cached(RECORD_GROUP).await?;
        let answer = client.query(&statement, &[&input]).await?;

        let (mut claimed, mut exists) = (vec![false; outcomes.len()], vec![false; outcomes.len()]);
        let mut batches = std::collections::HashMap::new();
        for row in &answer {
            match row.get::<_, &str>(0) {
                "claimed" => claimed[row.get::<_, i32>(1) as usize] = true,
                "exists" => exists[row.get::<_, i32>(1) as usize] = true,
                _ => {
                    let progress = Progress {
                        batch_id: row.get(2),
                        processed: row.get(3),
                        failed: row.get(4),
                        image_count: row.get(5),
                        completed: row.get::<_, Option<bool>>(6).unwrap_or(false),
                    };
                    batches.insert(progress.batch_id.clone(), progress);
                }
            }
        }
        // An outcome the statement did not see is a repeat of the group's first for its
        // image: it exists when that one does.
        let mut first_of = std::collections::HashMap::new();
        for (n, o) in outcomes.iter().enumerate() {
            let first = *first_of.entry((o.image.batch_id.as_str(), o.image.image_id.as_str())).or_insert(n);
            exists[n] = exists[first];
        }
        // Each batch's progress goes with its last claimed outcome of the group.
        let mut results: Vec<Result<Recorded, DbError>> = Vec::with_capacity(outcomes.len());
        for (n, outcome) in outcomes.iter().enumerate().rev() {
            let image = &outcome.image;
            results.push(if claimed[n] {
                let progress = batches.remove(&image.batch_id);
                let completed_batch = progress.as_ref().is_some_and(|p| p.completed);
                Ok(Recorded { first: true, completed_batch, progress })
            } else if exists[n] {
                Ok(Recorded { first: false, completed_batch: false, progress: None })
            } else {
                Err(DbError::UnknownImage { batch_id: image.batch_id.clone(), image_id: image.image_id.clone() })
            });
        }
        results.reverse();
        Ok(results)
    }
}
