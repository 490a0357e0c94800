//! `GET /api/batch/{batchId}/events`: a batch's progress as server-sent events.
//!
//! persist publishes an event on `<progress_subject>.<batch>` for every outcome it
//! records. Relaying those one by one would send a browser hundreds of events a
//! second during a large batch, and misses the changes no outcome makes (a batch that
//! fails as a whole, or completes when extract finishes reading after the last
//! outcome). So an event is a wake-up: the stream then reads the batch from
//! PostgreSQL, the source of truth, and sends its status, at most every
//! [`MIN_GAP`], and at least every [`QUIET_CHECK`] while nothing arrives. It ends
//! after the status that says the batch is finished.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use super::{ApiError, ApiState};
use crate::wire::BatchView;

/// Least time between two status events of one stream.
pub const MIN_GAP: Duration = Duration::from_millis(250);

/// Longest time without a status event while the batch runs.
pub const QUIET_CHECK: Duration = Duration::from_secs(5);

/// A batch's progress, live, as server-sent events.
///
/// Each `status` event's data is the batch, as `status` answers it under `batch`. The
/// first comes at once; the next follow the batch's progress, at most 4 a second and at
/// least one every 5 seconds; the last is the one whose `status` is `completed` or
/// `failed`, and the stream then ends. Comments keep the connection alive meanwhile.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/events",
    operation_id = "batchEvents",
    tag = "batches",
    params(("batchId" = String, Path, description = "The batch id.")),
    responses(
        (status = 200, description = "`text/event-stream` of `status` events, each carrying the batch as JSON.",
         content_type = "text/event-stream", body = crate::wire::BatchEvent),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn events(
    State(state): State<Arc<ApiState>>,
    Path(batch_id): Path<String>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    // An id is checked before it becomes part of a subject (no wildcards, no spaces).
    crate::batches::valid_batch_id(&batch_id)?;
    // Subscribed before the first read, so no change between the two goes unseen.
    let subject = format!("{}.{}", state.topology.nats.progress_subject, batch_id);
    let wakeups = state.bus.client.subscribe(subject).await.map_err(|e| ApiError::unavailable("NATS", e))?;
    let first = crate::batches::batch_or_404(&state, &batch_id).await?;
    let watch = Watch { state, batch_id, wakeups, first: Some(first.into()) };
    let stream = futures::stream::unfold(Some(watch), |watch| async move {
        let mut watch = watch?;
        let batch = match watch.first.take() {
            Some(batch) => batch,
            None => match watch.next().await {
                Ok(batch) => batch,
                // Said once, then the stream ends: the client's EventSource reconnects.
                Err(e) => return Some((Ok(Event::default().event("error").data(e.message)), None)),
            },
        };
        let finished = batch.status.is_finished();
        let event = Event::default().event("status").json_data(&batch).expect("a batch serializes");
        Some((Ok(event), (!finished).then_some(watch)))
    });
    let stream: BoxStream<'static, Result<Event, Infallible>> = stream.boxed();
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One stream's state.
struct Watch {
    state: Arc<ApiState>,
    batch_id: String,
    wakeups: async_nats::Subscriber,
    /// The status read before the stream started, sent first.
    first: Option<BatchView>,
}

impl Watch {
    /// Waits for progress (or [`QUIET_CHECK`]), lets a burst settle, and reads the batch.
    async fn next(&mut self) -> Result<BatchView, ApiError> {
        let started = tokio::time::Instant::now();
        let _ = tokio::time::timeout(QUIET_CHECK, self.wakeups.next()).await;
        tokio::time::sleep_until(started + MIN_GAP).await;
        // The events of the burst are all answered by the one read below.
        while let Some(Some(_)) = self.wakeups.next().now_or_never() {}
        Ok(crate::batches::batch_or_404(&self.state, &self.batch_id).await?.into())
    }
}
