//! The stages' queues: `GET /api/batch/queue-stats` (counts per stage, and the old
//! design's `stats` object under its queue names) and `GET /api/stats` (the
//! dashboard's live view: bands, replicas, throughput).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use std::collections::BTreeMap;

use facepipe_core::domain::StageName;

use super::{ApiError, ApiState};
use crate::wire::{OldStats, QueueCounts, QueueStatsAnswer, ReplicaView, Sample, StageStats, StatsAnswer};

/// The old design's queue names, mapped onto the stages that do their work now:
/// `batchIngestion` was the ZIP unpacking job, `faceDetection` the per-image
/// detect-and-crop job (now split into detect and crop), and results were
/// written in that same job (now persist).
const OLD_NAMES: [(StageName, &str); 4] = [
    (StageName::Extract, "batchIngestion"),
    (StageName::Detect, "faceDetection"),
    (StageName::Crop, "faceCrop"),
    (StageName::Persist, "resultPersist"),
];

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
    let queues = stage_stats(&state).await?;
    let mut by_old_name = BTreeMap::new();
    let mut by_stage = BTreeMap::new();
    for q in &queues {
        let counts = QueueCounts {
            waiting: q.waiting,
            active: q.active,
            completed: q.completed,
            failed: q.failed,
            delayed: q.retrying,
            idle_pullers: q.idle_pullers,
            replicas: q.replicas,
        };
        if let Some((_, old)) = OLD_NAMES.iter().find(|(stage, _)| *stage == q.stage) {
            by_old_name.insert(old.to_string(), counts.clone());
        }
        by_stage.insert(q.stage.to_string(), counts);
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

/// Every stage's queue and failures, or 503 naming the service that did not answer.
async fn stage_stats(state: &ApiState) -> Result<Vec<facepipe_control::stats::QueueStats>, ApiError> {
    use facepipe_control::stats::StatsError;
    facepipe_control::stats::stage_stats(&state.bus, &state.db, &state.topology).await.map_err(|e| match e {
        StatsError::Bus(e) => ApiError::unavailable("NATS", e),
        StatsError::Db(e) => ApiError::unavailable("PostgreSQL", e),
    })
}

/// Milliseconds since the Unix epoch, as the old design's `stats.timestamp`.
fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How far back [`Throughput`] keeps samples.
const HISTORY: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Least time between two kept samples (dashboards poll every 2 s each).
const SAMPLE_GAP: std::time::Duration = std::time::Duration::from_secs(2);

/// The window `perSecond` is measured over.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Each stage's `completed` count, sampled whenever someone asks for `/api/stats`
/// (no one watching costs nothing), for throughput over the last minutes.
#[derive(Debug, Default)]
pub struct Throughput {
    samples: std::sync::Mutex<std::collections::VecDeque<(u64, BTreeMap<String, u64>)>>,
}

impl Throughput {
    /// Records `completed` per stage at `now` (Unix ms) and returns, per stage, the
    /// samples kept and the rate over the last [`RATE_WINDOW`].
    fn record(&self, now: u64, completed: BTreeMap<String, u64>) -> BTreeMap<String, (Vec<Sample>, Option<f64>)> {
        let mut samples = self.samples.lock().expect("no panics while held");
        let gap = SAMPLE_GAP.as_millis() as u64;
        if samples.back().is_none_or(|(t, _)| now >= t + gap) {
            samples.push_back((now, completed.clone()));
        }
        let horizon = now.saturating_sub(HISTORY.as_millis() as u64);
        while samples.front().is_some_and(|(t, _)| *t < horizon) {
            samples.pop_front();
        }
        let window_start = now.saturating_sub(RATE_WINDOW.as_millis() as u64);
        let mut out = BTreeMap::new();
        for (stage, &count) in &completed {
            let history: Vec<Sample> =
                samples.iter().filter_map(|(t, c)| c.get(stage).map(|&completed| Sample { t: *t, completed })).collect();
            // The oldest sample within the window, at least a few seconds back.
            let rate = history
                .iter()
                .find(|s| s.t >= window_start && now - s.t >= 2 * gap)
                .map(|s| count.saturating_sub(s.completed) as f64 * 1000.0 / (now - s.t) as f64);
            out.insert(stage.clone(), (history, rate));
        }
        out
    }
}

/// Every stage's queue, live: `pipeline stats` with the replicas named and the
/// throughput of the last minutes.
///
/// `GET /api/stats`. Throughput is sampled by this server each time it answers, so it
/// covers the minutes someone has been watching.
#[utoipa::path(
    get,
    path = "/api/stats",
    operation_id = "stats",
    tag = "queues",
    responses(
        (status = 200, description = "The stages.", body = StatsAnswer),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn stats(State(state): State<Arc<ApiState>>) -> Result<Json<StatsAnswer>, ApiError> {
    let queues = stage_stats(&state).await?;
    let now = unix_millis();
    let mut rates = state.throughput.record(now, queues.iter().map(|q| (q.stage.to_string(), q.completed)).collect());
    let stages = queues
        .into_iter()
        .map(|q| {
            let (history, per_second) = rates.remove(q.stage.as_str()).unwrap_or_default();
            StageStats {
                failed: q.failed,
                waiting: q.waiting,
                active: q.active,
                retrying: q.retrying,
                completed: q.completed,
                idle_pullers: q.idle_pullers,
                waiting_by_band: q.waiting_by_band,
                replicas: q
                    .processes
                    .into_iter()
                    .map(|p| ReplicaView { host: p.host, pid: p.pid, concurrency: p.concurrency, in_flight: p.in_flight })
                    .collect(),
                per_second,
                history,
                stage: q.stage.to_string(),
            }
        })
        .collect();
    Ok(Json(StatsAnswer { success: true, timestamp: now, stages }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_measured_over_the_last_minute_of_samples() {
        let t = Throughput::default();
        let at = |n: u64| BTreeMap::from([("detect".to_string(), n)]);
        let first = t.record(1_000_000, at(100));
        assert_eq!(first["detect"].1, None, "one sample gives no rate");
        assert!(t.record(1_001_000, at(105))["detect"].0.len() == 1, "samples closer than the gap are not kept");
        let later = t.record(1_010_000, at(150));
        assert_eq!(later["detect"].1, Some(5.0), "50 in 10 s");
        // Ten minutes on, the old samples are gone and the window starts afresh.
        let much_later = t.record(1_010_000 + 11 * 60_000, at(400));
        assert_eq!(much_later["detect"].0.len(), 1);
        assert_eq!(much_later["detect"].1, None);
    }
}
