//! `GET /api/batch/queue-stats`: queue counts per stage, and the old design's
//! `stats` object under its queue names.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::{ApiError, ApiState};

/// The old design's queue names, mapped onto the stages that do their work now:
/// `batchIngestion` was the ZIP unpacking job, `faceDetection` the per-image
/// detect-and-crop job (now split into detect and crop), and results were
/// written in that same job (now persist).
const OLD_NAMES: [(&str, &str); 4] =
    [("extract", "batchIngestion"), ("detect", "faceDetection"), ("crop", "faceCrop"), ("persist", "resultPersist")];

/// Per stage: `waiting`, `active`, `completed`, `failed`, `delayed` (retrying), `idlePullers`.
pub async fn queue_stats(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let queues = facepipe_control::stats::queue_stats(&state.bus, &state.topology).await.map_err(|e| ApiError::unavailable("NATS", e))?;
    let failed = state.db.failed_by_stage().await.map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    let mut by_old_name = Map::new();
    let mut by_stage = Map::new();
    for q in &queues {
        let counts = json!({
            "waiting": q.waiting,
            "active": q.active,
            "completed": q.completed,
            "failed": failed.get(&q.stage).copied().unwrap_or(0),
            "delayed": q.retrying,
            "idlePullers": q.idle_pullers,
            "replicas": q.replicas,
        });
        if let Some((_, old)) = OLD_NAMES.iter().find(|(stage, _)| *stage == q.stage) {
            by_old_name.insert(old.to_string(), counts.clone());
        }
        by_stage.insert(q.stage.clone(), counts);
    }
    // The old design's own shape, which its monitoring recipes read (`jq .stats.faceDetection.failed`).
    let mut stats = by_old_name.clone();
    stats.insert("timestamp".into(), json!(chrono_millis()));
    Ok(Json(json!({ "success": true, "stats": stats, "queues": by_old_name, "stages": by_stage })))
}

/// Milliseconds since the Unix epoch, as the old design's `stats.timestamp`.
fn chrono_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
}
