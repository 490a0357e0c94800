//! Reading batches the way the dashboard shows them: the list, one batch's
//! failures grouped by reason, one image and its original.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::batches::{batch_or_404, valid_batch_id};
use crate::error::optional_param;
use crate::wire::{BatchList, BatchRow, FailureGroupView, FailureGroups, ImageAnswer, ImageView};
use facepipe_core::domain::BatchStatus;
use facepipe_core::keys;
use crate::listing::{BatchCursor, BatchFilter};
use facepipe_runtime::store::StoreError;

/// Query of `GET /api/batches`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this project's batches.
    project: Option<String>,
    /// Only batches in this state: ingesting, processing, completed or failed.
    status: Option<String>,
    /// Start after this cursor: the `nextBefore` of the previous page.
    before: Option<String>,
    /// Batches per page, 1-200.
    #[param(minimum = 1, maximum = 200, default = 25)]
    limit: Option<i64>,
}

/// Batches, newest first, paged, filtered by project and status.
///
/// `GET /api/batches?project=&status=&limit=25&before=<nextBefore>`. Each row is the
/// batch as `status` answers it, with its average pace and the time left at that pace.
#[utoipa::path(
    get,
    path = "/api/batches",
    operation_id = "listBatches",
    tag = "batches",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of batches.", body = BatchList),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BatchList>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(25);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request("`limit` must be 1-200"));
    }
    let status: Option<BatchStatus> = optional_param(q.status.as_deref())?;
    let before = q.before.as_deref().map(str::parse::<BatchCursor>).transpose().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let project = q.project.filter(|p| !p.is_empty());
    // PostgreSQL text cannot hold NUL, so no project is named with one.
    if project.as_deref().is_some_and(|p| p.contains('\0')) {
        return Err(ApiError::bad_request("`project` holds a NUL character"));
    }
    let filter = BatchFilter { project, status, before, limit };
    let page = crate::listing::list_batches(&state.db, &filter).await.map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    let now = chrono::Utc::now();
    Ok(Json(BatchList {
        success: true,
        batches: page.batches.into_iter().map(|b| BatchRow::new(b, now)).collect(),
        next_before: page.next_before.map(|c| c.to_string()),
    }))
}

/// A batch's failed images, grouped by the stage that failed and the reason.
///
/// `GET /api/batch/{batchId}/failures`: biggest groups first, each with its first image.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/failures",
    operation_id = "batchFailures",
    tag = "batches",
    params(("batchId" = String, Path, description = "The batch id.")),
    responses(
        (status = 200, description = "The groups.", body = FailureGroups),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn failures(State(state): State<Arc<ApiState>>, Path(batch_id): Path<String>) -> Result<Json<FailureGroups>, ApiError> {
    batch_or_404(&state, &batch_id).await?;
    let groups = crate::listing::failure_groups(&state.db, &batch_id).await.map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    let groups = groups
        .into_iter()
        .map(|g| FailureGroupView { stage: g.stage, reason: g.reason, count: g.count, example: g.example })
        .collect();
    Ok(Json(FailureGroups { success: true, batch_id, groups }))
}

/// Looks up one image, or answers 404.
async fn image_or_404(state: &ApiState, batch_id: &str, image_id: &str) -> Result<facepipe_ledger::ImageResult, ApiError> {
    let missing = || ApiError::not_found(format!("no image `{image_id}` in batch `{batch_id}`"));
    valid_batch_id(batch_id)?;
    if !keys::is_valid_id(image_id) {
        return Err(missing());
    }
    crate::listing::image(&state.db, batch_id, image_id).await.map_err(|e| ApiError::unavailable("PostgreSQL", e))?.ok_or_else(missing)
}

/// One image's outcome: its faces (in upright original pixels), crops and error.
///
/// `GET /api/batch/{batchId}/images/{imageId}`.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/images/{imageId}",
    operation_id = "batchImage",
    tag = "batches",
    params(
        ("batchId" = String, Path, description = "The batch id."),
        ("imageId" = String, Path, description = "The image id, as in the results."),
    ),
    responses(
        (status = 200, description = "The image.", body = ImageAnswer),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn image(
    State(state): State<Arc<ApiState>>,
    Path((batch_id, image_id)): Path<(String, String)>,
) -> Result<Json<ImageAnswer>, ApiError> {
    let result = image_or_404(&state, &batch_id, &image_id).await?;
    let original_url = result
        .original_key
        .as_deref()
        .filter(|k| !k.is_empty())
        .map(|_| format!("/api/batch/{batch_id}/images/{image_id}/original"));
    Ok(Json(ImageAnswer { success: true, image: ImageView::new(&batch_id, result), original_url }))
}

/// The image as it was uploaded or downloaded (not rotated upright: browsers
/// apply its EXIF orientation when they draw it, as the boxes assume).
///
/// `GET /api/batch/{batchId}/images/{imageId}/original`; 404 once retention has removed it.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/images/{imageId}/original",
    operation_id = "batchImageOriginal",
    tag = "batches",
    params(
        ("batchId" = String, Path, description = "The batch id."),
        ("imageId" = String, Path, description = "The image id."),
    ),
    responses(
        (status = 200, description = "The original's bytes, with its image type when it is a known one.",
         content_type = "application/octet-stream", body = [u8]),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn original(
    State(state): State<Arc<ApiState>>,
    Path((batch_id, image_id)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let result = image_or_404(&state, &batch_id, &image_id).await?;
    let gone = || ApiError::not_found(format!("the original of image `{image_id}` is not stored (any more)"));
    let key = result.original_key.filter(|k| !k.is_empty()).ok_or_else(gone)?;
    let bytes = match state.store.get(&key).await {
        Ok(bytes) => bytes,
        Err(StoreError::NotFound(_)) => return Err(gone()),
        Err(e) => return Err(ApiError::unavailable("the object store", e)),
    };
    Ok(crate::stored::stored_file(&image_id, bytes))
}
