//! Dead letters over HTTP: list them (by batch and stage) and replay one, a
//! batch's, or all, as `pipeline dead-letters` does.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::error::optional_param;
use crate::wire::{DeadLetterList, DeadLetterView, ReplayAnswer, ReplayRequest};
use facepipe_control::deadletters::{self, DeadLetterError, Filter, Stored};
use facepipe_core::domain::StageName;

/// Most ids one replay request may name.
const MAX_REPLAY_IDS: usize = 1000;

/// Query of `GET /api/dead-letters`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this batch's letters.
    batch: Option<String>,
    /// Only this stage's letters: extract, detect, crop or persist.
    stage: Option<String>,
    /// Start after this id: the `nextAfter` of the previous page.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Letters per page, 1-500.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<usize>,
}

fn unavailable(e: DeadLetterError) -> ApiError {
    match e {
        DeadLetterError::Db(e) => ApiError::unavailable("PostgreSQL", e),
        e => ApiError::unavailable("NATS", e),
    }
}

fn view(s: Stored) -> DeadLetterView {
    let l = s.letter;
    DeadLetterView {
        id: s.id,
        stage: l.stage,
        subject: l.subject,
        error: l.error,
        permanent: l.permanent,
        attempts: l.attempts,
        batch_id: l.batch_id,
        image_id: l.image_id,
        time: l.time,
    }
}

/// Messages the stages gave up on, oldest first, paged.
///
/// `GET /api/dead-letters?batch=&stage=&after=&limit=50`.
#[utoipa::path(
    get,
    path = "/api/dead-letters",
    operation_id = "listDeadLetters",
    tag = "dead letters",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of dead letters.", body = DeadLetterList),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("`limit` must be 1-500"));
    }
    let stage: Option<StageName> = optional_param(q.stage.as_deref())?;
    let batch = q.batch.as_deref().filter(|b| !b.is_empty());
    let after = u64::try_from(q.after.unwrap_or(0)).map_err(|_| ApiError::bad_request("`after` must be at least 0"))?;
    let filter = Filter { batch, stage, after, limit };
    let page = deadletters::list(&state.bus, &state.topology, &filter).await.map_err(unavailable)?;
    Ok(Json(DeadLetterList { success: true, letters: page.letters.into_iter().map(view).collect(), next_after: page.next_after }))
}

/// Puts dead letters back on their subjects: `{"ids": [..]}`, `{"batch": ".."}` or `{"all": true}`.
///
/// `POST /api/dead-letters/replay`. Each letter's image (or failed batch) is reopened
/// first, then the message is published again, then the letter is deleted. Ids that
/// are no longer dead letters are skipped; `replayed` counts the others.
#[utoipa::path(
    post,
    path = "/api/dead-letters/replay",
    operation_id = "replayDeadLetters",
    tag = "dead letters",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "The letters were replayed.", body = ReplayAnswer),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::TooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn replay(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<ReplayRequest>, JsonRejection>,
) -> Result<Json<ReplayAnswer>, ApiError> {
    let Json(request) = body?;
    let (bus, db, topology) = (&state.bus, &state.db, &state.topology);
    let replayed = match request {
        ReplayRequest { ids: Some(ids), batch: None, all: None } => {
            if ids.is_empty() || ids.len() > MAX_REPLAY_IDS {
                return Err(ApiError::bad_request(format!("`ids` must name 1-{MAX_REPLAY_IDS} letters")));
            }
            let ids = ids
                .into_iter()
                .map(u64::try_from)
                .collect::<Result<Vec<u64>, _>>()
                .map_err(|_| ApiError::bad_request("an id is below 0"))?;
            let letters = deadletters::get(bus, topology, &ids).await.map_err(unavailable)?;
            deadletters::replay(bus, db, topology, &letters).await
        }
        ReplayRequest { ids: None, batch: Some(batch), all: None } => {
            if !facepipe_core::keys::is_valid_id(&batch) {
                return Err(ApiError::bad_request(format!("`{batch}` is not a batch id")));
            }
            deadletters::replay_all(bus, db, topology, Some(&batch)).await
        }
        ReplayRequest { ids: None, batch: None, all: Some(true) } => deadletters::replay_all(bus, db, topology, None).await,
        _ => return Err(ApiError::bad_request("give exactly one of `ids`, `batch` or `\"all\": true`")),
    }
    .map_err(unavailable)?;
    tracing::info!(replayed, "dead letters replayed through the API");
    Ok(Json(ReplayAnswer { success: true, replayed }))
}
