//! Batch endpoints: start a batch from a ZIP upload or a URL list, follow it,
//! read its outcomes and download its crops.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Multipart, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{ApiError, ApiState};
use crate::error::optional_param;
use crate::wire::{AddImages, BatchStarted, ImageView, PriorityInput, RecordId, ResultsPage, StatusAnswer, UploadZipForm};
use facepipe_archive as archive;
use facepipe_core::domain::{ImageStatus, Priority};
use facepipe_ledger::{BatchSummary, PageStart};
use facepipe_core::keys;
use facepipe_control::batches::{BatchError, ZipUpload};
use facepipe_core::messages::RemoteImage;
use facepipe_runtime::store::StoreError;

/// Longest text field (`projectId`, `priority`) accepted in an upload form.
const MAX_FORM_FIELD: usize = 1024;

/// Start a batch from a ZIP of photos (streamed; at most `api.max_upload_bytes`, 5 GiB by default).
///
/// `POST /api/batch/upload-zip` (multipart: `file`, `projectId`, optional `priority`).
/// The file is streamed to a spool file under the size cap, its image entries
/// are counted from the ZIP's central directory (so `imageCount` and `queued`
/// are known at once), then it is moved (local store) or copied into the object
/// store and one extract job is published.
#[utoipa::path(
    post,
    path = "/api/batch/upload-zip",
    operation_id = "uploadZip",
    tag = "batches",
    request_body(content = UploadZipForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The batch is started.", body = BatchStarted),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::TooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, response = crate::openapi::TooMany),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn upload_zip(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<BatchStarted>, ApiError> {
    let limit = state.topology.api.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The form's other fields and boundaries take a little room beside the file.
    if declared.is_some_and(|n| n > limit.saturating_add(64 << 10)) {
        return Err(too_large_upload(limit));
    }
    state.limiter.check(client.ip())?;
    let mut multipart = multipart?;

    let mut project_id = None;
    let mut priority = None;
    let mut upload = None;
    while let Some(mut field) = multipart.next_field().await? {
        match field.name().unwrap_or("") {
            "file" => {
                let file_name = field.file_name().unwrap_or("upload.zip").to_string();
                upload = Some((spool(&state, &mut field, limit).await?, file_name));
            }
            "projectId" => project_id = Some(form_text(&mut field).await?),
            "priority" => priority = Some(form_text(&mut field).await?),
            // Unknown fields are read past, never kept.
            _ => while field.chunk().await?.is_some() {},
        }
    }
    let project_id = required_project(project_id)?;
    let priority = parse_priority(priority.map(PriorityInput::Text))?;
    let Some((spooled, file_name)) = upload else {
        return Err(ApiError::bad_request("the form has no `file` field (the ZIP)"));
    };

    let params = state.topology.stages.extract.params.clone();
    let path = spooled.path().to_owned();
    let image_count = tokio::task::spawn_blocking(move || archive::count_images(&path, &params))
        .await
        .map_err(|e| ApiError::unavailable("the archive reader", e))?
        .map_err(|e| ApiError::bad_request(format!("`{file_name}` is not a usable ZIP archive: {e}")))?;

    let batch_id = keys::new_batch_id(&project_id, &file_name);
    let upload = ZipUpload::Spooled(spooled);
    state.batches.submit_zip(batch_id.clone(), project_id, priority, upload, &format!("upload:{file_name}")).await.map_err(refused)?;
    tracing::info!(batch = %batch_id, images = image_count, %client, "ZIP uploaded");
    Ok(batch_started(&batch_id, image_count, "ZIP received: {n} image(s) queued for face detection"))
}

/// The old design's answer to a new batch; `message` has `{n}` for the image count.
fn batch_started(batch_id: &str, images: usize, message: &str) -> Json<BatchStarted> {
    Json(BatchStarted {
        success: true,
        batch_id: batch_id.to_string(),
        image_count: images,
        queued: images,
        message: message.replace("{n}", &images.to_string()),
    })
}

/// Writes one form field to a spool file, refusing it (413) past `limit` bytes.
async fn spool(
    state: &ApiState,
    field: &mut axum::extract::multipart::Field<'_>,
    limit: u64,
) -> Result<tempfile::NamedTempFile, ApiError> {
    let dir = state.topology.api.upload_dir.clone().unwrap_or_else(std::env::temp_dir);
    let io = |e: std::io::Error| ApiError::unavailable("the upload spool directory", e);
    // Removed when dropped: on success, on any error, and on a client that goes away.
    let spooled = facepipe_runtime::scratch::file_in(&dir, "upload").map_err(io)?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(spooled.reopen().map_err(io)?));
    let mut written = 0u64;
    while let Some(chunk) = field.chunk().await? {
        written += chunk.len() as u64;
        if written > limit {
            return Err(too_large_upload(limit));
        }
        out.write_all(&chunk).await.map_err(io)?;
    }
    out.flush().await.map_err(io)?;
    Ok(spooled)
}

fn too_large_upload(limit: u64) -> ApiError {
    ApiError::too_large(format!("the upload is larger than the {limit} byte limit (api.max_upload_bytes)"))
}

/// Reads a small text field of a form.
async fn form_text(field: &mut axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    let name = field.name().unwrap_or("").to_string();
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_FORM_FIELD {
            return Err(ApiError::bad_request(format!("form field `{name}` is longer than {MAX_FORM_FIELD} bytes")));
        }
    }
    String::from_utf8(bytes).map_err(|_| ApiError::bad_request(format!("form field `{name}` is not UTF-8")))
}

/// The project id, trimmed; as the document says: 1-256 characters, not only spaces.
fn required_project(project_id: Option<String>) -> Result<String, ApiError> {
    match project_id {
        Some(p) if !p.trim().is_empty() && p.chars().count() <= 256 => Ok(p.trim().to_string()),
        Some(_) => Err(ApiError::bad_request("`projectId` must be 1-256 characters, not only spaces")),
        None => Err(ApiError::bad_request("`projectId` is required")),
    }
}

/// The priority given (a number or a numeric string, 1-10), or the default when absent.
fn parse_priority(value: Option<PriorityInput>) -> Result<Priority, ApiError> {
    let Some(value) = value else { return Ok(Priority::DEFAULT) };
    value
        .priority()
        .ok_or_else(|| ApiError::bad_request(format!("`priority` must be an integer from 1 to 10, not {value:?}")))
}

/// A batch the service could not start, as the API answers it.
fn refused(e: BatchError) -> ApiError {
    match e {
        BatchError::TooLarge { .. } => ApiError::too_large(e.to_string()),
        BatchError::InvalidId(_) => ApiError::bad_request(e.to_string()),
        BatchError::Store(e) => ApiError::unavailable("the object store", e),
        BatchError::Db(e) => ApiError::unavailable("PostgreSQL", e),
        BatchError::Bus(e) => ApiError::unavailable("NATS", e),
        BatchError::TimedOut { .. } => ApiError::unavailable("the pipeline", e),
        BatchError::Unknown(_) => ApiError::not_found(e.to_string()),
    }
}

/// Start a batch of images the extract stage downloads by URL.
///
/// `POST /api/batch/add-images`.
#[utoipa::path(
    post,
    path = "/api/batch/add-images",
    operation_id = "addImages",
    tag = "batches",
    request_body = AddImages,
    responses(
        (status = 200, description = "The batch is started.", body = BatchStarted),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::TooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, response = crate::openapi::TooMany),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn add_images(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    body: Result<Json<AddImages>, JsonRejection>,
) -> Result<Json<BatchStarted>, ApiError> {
    let Json(request) = body?;
    let project_id = required_project(Some(request.project_id))?;
    let priority = parse_priority(request.priority)?;
    let max = state.topology.api.max_images_per_request;
    if request.images.is_empty() {
        return Err(ApiError::bad_request("`images` is empty"));
    }
    if request.images.len() > max {
        return Err(ApiError::too_large(format!(
            "{} images in one request, more than {max} (api.max_images_per_request)",
            request.images.len()
        )));
    }
    let mut images = Vec::with_capacity(request.images.len());
    for (i, image) in request.images.into_iter().enumerate() {
        let url = url::Url::parse(&image.image_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| ApiError::bad_request(format!("images[{i}].imageUrl is not an http(s) URL")))?;
        let record_id = image.record_id.map(|id| match id {
            RecordId::Text(s) => s,
            RecordId::Number(n) => n.to_string(),
        });
        images.push(RemoteImage { record_id, url: url.to_string() });
    }
    state.limiter.check(client.ip())?;
    let count = images.len();
    let batch_id = keys::new_batch_id(&project_id, &format!("{count} urls"));
    state.batches.submit_urls(batch_id.clone(), project_id, priority, images).await.map_err(refused)?;
    tracing::info!(batch = %batch_id, images = count, %client, "image URLs queued");
    Ok(batch_started(&batch_id, count, "{n} image(s) queued for download and face detection"))
}

/// 404 for an id no batch can have (also keeps it out of NATS subjects and object keys).
pub(crate) fn valid_batch_id(batch_id: &str) -> Result<(), ApiError> {
    if keys::is_valid_id(batch_id) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no batch `{batch_id}`")))
    }
}

pub(crate) async fn batch_or_404(state: &ApiState, batch_id: &str) -> Result<BatchSummary, ApiError> {
    valid_batch_id(batch_id)?;
    state
        .db
        .batch_status(batch_id)
        .await
        .map_err(|e| ApiError::unavailable("PostgreSQL", e))?
        .ok_or_else(|| ApiError::not_found(format!("no batch `{batch_id}`")))
}

/// A batch's progress.
///
/// `GET /api/batch/status/{batchId}`: the old shape, `batch.progress.{processed,total,failed}`.
#[utoipa::path(
    get,
    path = "/api/batch/status/{batchId}",
    operation_id = "batchStatus",
    tag = "batches",
    params(("batchId" = String, Path, description = "The batch id `upload-zip` or `add-images` answered.")),
    responses(
        (status = 200, description = "The batch.", body = StatusAnswer),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn status(State(state): State<Arc<ApiState>>, Path(batch_id): Path<String>) -> Result<Json<StatusAnswer>, ApiError> {
    let batch = batch_or_404(&state, &batch_id).await?;
    Ok(Json(StatusAnswer { success: true, batch: batch.into() }))
}

/// Query of `GET /api/batch/{batchId}/results`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// 1-based page number.
    #[serde(default = "first_page")]
    #[param(minimum = 1, default = 1)]
    page: i64,
    /// Images per page, 1-1000.
    #[serde(default = "default_page_size")]
    #[param(minimum = 1, maximum = 1000, default = 100)]
    page_size: i64,
    /// Start after this image id: the `nextAfter` of the previous page. Faster than
    /// `page` deep into a large batch; `page` is ignored when it is given.
    #[serde(default)]
    after: Option<String>,
    /// Only images in this state: pending, cropped, no_face or failed. Filtered
    /// pages go on by `after` (`page` must be 1).
    #[serde(default)]
    status: Option<String>,
}

fn first_page() -> i64 {
    1
}
fn default_page_size() -> i64 {
    100
}

/// Per-image outcomes, paged, in image order.
///
/// `GET /api/batch/{batchId}/results?page=1&pageSize=100`, or by key:
/// `?after=<nextAfter of the previous page>`.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/results",
    operation_id = "batchResults",
    tag = "batches",
    params(("batchId" = String, Path, description = "The batch id."), Page),
    responses(
        (status = 200, description = "One page of outcomes.", body = ResultsPage),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn results(
    State(state): State<Arc<ApiState>>,
    Path(batch_id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ResultsPage>, ApiError> {
    let Query(page) = page?;
    if page.page < 1 || !(1..=1000).contains(&page.page_size) {
        return Err(ApiError::bad_request("`page` must be at least 1 and `pageSize` 1-1000"));
    }
    let status: Option<ImageStatus> = optional_param(page.status.as_deref())?;
    // An empty `after` starts at the beginning. Image ids are ids: anything else
    // matches nothing (and never reaches a query as, say, a NUL).
    let after = page.after.filter(|a| !a.is_empty());
    if after.as_deref().is_some_and(|a| !keys::is_valid_id(a)) {
        return Err(ApiError::bad_request("`after` is not an image id (pass a page's nextAfter)"));
    }
    if status.is_some() && page.page > 1 && after.is_none() {
        return Err(ApiError::bad_request("with `status`, go on with `after` (the previous page's nextAfter), not `page`"));
    }
    let b = batch_or_404(&state, &batch_id).await?;
    let rows = match (status, after) {
        (Some(status), after) => crate::listing::results_with_status(&state.db, &batch_id, status, after.as_deref(), page.page_size).await,
        (None, Some(after)) => state.db.results_page(&batch_id, &PageStart::After(after), page.page_size).await,
        (None, None) => {
            let skip = (page.page - 1).saturating_mul(page.page_size);
            state.db.results_page(&batch_id, &PageStart::Offset(skip), page.page_size).await
        }
    }
    .map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    let next_after = (rows.len() as i64 == page.page_size).then(|| rows.last().map(|r| r.image_id.clone())).flatten();
    Ok(Json(ResultsPage {
        next_after,
        success: true,
        status: b.status,
        page: page.page,
        page_size: page.page_size,
        total: b.image_count,
        results: rows.into_iter().map(|r| ImageView::new(&batch_id, r)).collect(),
        batch_id,
    }))
}

/// One crop as JPEG (names as in the results' `crops[].url`).
///
/// `GET /api/batch/{batchId}/crops/{name}`.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/crops/{name}",
    operation_id = "batchCrop",
    tag = "batches",
    params(
        ("batchId" = String, Path, description = "The batch id."),
        ("name" = String, Path, description = "The crop's file name, `<image>-<face>.jpg`."),
    ),
    responses(
        (status = 200, description = "The crop.", content_type = "image/jpeg", body = [u8]),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn crop(
    State(state): State<Arc<ApiState>>,
    Path((batch_id, name)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let valid_name = name
        .strip_suffix(".jpg")
        .is_some_and(|stem| keys::is_valid_id(stem));
    if !keys::is_valid_id(&batch_id) || !valid_name {
        return Err(ApiError::not_found(format!("no crop `{name}` in batch `{batch_id}`")));
    }
    let key = keys::crop_key_of(&batch_id, &name);
    match state.store.get(&key).await {
        Ok(bytes) => Ok(crate::stored::stored_file(name.trim_end_matches(".jpg"), bytes)),
        Err(StoreError::NotFound(_)) => Err(ApiError::not_found(format!("no crop `{name}` in batch `{batch_id}`"))),
        Err(e) => Err(ApiError::unavailable("the object store", e)),
    }
}
