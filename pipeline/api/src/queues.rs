//! `GET /api/batch/queue-stats`: queue counts per stage, and the old design's
//! `stats` object under its queue names.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use std::collections::BTreeMap;

use super::{ApiError, ApiState};
use crate::wire::{OldStats, QueueCounts, QueueStatsAnswer};

/// The old design's queue names, mapped onto the stages that do their work now:
/// `batchIngestion` was the ZIP unpacking job, `faceDetection` the per-image
/// detect-and-crop job (now split into detect and crop), and results were
/// written in that same job (now persist).
const OLD_NAMES: [(&str, &str); 4] =
    [("extract", "batchIngestion"), ("detect", "faceDetection"), ("crop", "faceCrop"), ("persist", "resultPersist")];

/// Queue counts per stage, also under the old queue names.
///
/// Per stage: `waiting`, `active`, `completed`, `failed`, `delayed` (retrying),
/// `idlePullers`, `replicas`.
#[utoipa::path(
    get,
    path = "/api/batch/queue-stats",
    operation_id = "queueStats",
    tag = "queues",
    responses(
        (status = 200, description = "The counts.", body = QueueStatsAnswer),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn queue_stats(State(state): State<Arc<ApiState>>) -> Result<Json<QueueStatsAnswer>, ApiError> {
    let queues = facepipe_control::stats::queue_stats(&state.bus, &state.topology).await.map_err(|e| ApiError::unavailable("NATS", e))?;
    let failed = state.db.failed_by_stage().await.map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    let mut by_old_name = BTreeMap::new();
    let mut by_stage = BTreeMap::new();
    for q in &queues {
        let counts = QueueCounts {
            waiting: q.waiting,
            active: q.active,
            completed: q.completed,
            failed: failed.get(&q.stage).copied().unwrap_or(0),
            delayed: q.retrying,
            idle_pullers: q.idle_pullers,
            replicas: q.replicas,
        };
        if let Some((_, old)) = OLD_NAMES.iter().find(|(stage, _)| *stage == q.stage) {
            by_old_name.insert(old.to_string(), counts.clone());
        }
        by_stage.insert(q.stage.clone(), counts);
    }
    let old = |name: &str| by_old_name.get(name).cloned().unwrap_or_default();
    let stats = OldStats {
        batch_ingestion: old("batchIngestion"),
        face_detection: old("faceDetection"),
        face_crop: old("faceCrop"),
        result_persist: old("resultPersist"),
        timestamp: unix_millis(),
    };
    Ok(Json(QueueStatsAnswer { success: true, stats, queues: by_old_name, stages: by_stage }))
}

/// Milliseconds since the Unix epoch, as the old design's `stats.timestamp`.
fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
