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
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::{ApiError, ApiState};
use extract::archive;
use facepipe_core::domain::Priority;
use facepipe_runtime::db::{BatchSummary, ImageResult};
use facepipe_core::keys;
use facepipe_control::batches::{BatchError, ZipUpload};
use facepipe_core::messages::RemoteImage;
use facepipe_runtime::store::StoreError;

/// Longest text field (`projectId`, `priority`) accepted in an upload form.
const MAX_FORM_FIELD: usize = 1024;

/// `POST /api/batch/upload-zip` (multipart: `file`, `projectId`, optional `priority`).
///
/// The file is streamed to a spool file under the size cap, its image entries
/// are counted from the ZIP's central directory (so `imageCount` and `queued`
/// are known at once), then it is moved (local store) or copied into the object
/// store and one extract job is published.
pub async fn upload_zip(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
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
    let priority = match priority {
        Some(text) => parse_priority(&Value::String(text))?,
        None => Priority::DEFAULT,
    };
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
fn batch_started(batch_id: &str, images: usize, message: &str) -> Json<Value> {
    Json(json!({
        "success": true,
        "batchId": batch_id,
        "imageCount": images,
        "queued": images,
        "message": message.replace("{n}", &images.to_string()),
    }))
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

fn required_project(project_id: Option<String>) -> Result<String, ApiError> {
    match project_id.map(|p| p.trim().to_string()) {
        Some(p) if !p.is_empty() && p.len() <= 256 => Ok(p),
        Some(_) => Err(ApiError::bad_request("`projectId` must be 1-256 characters")),
        None => Err(ApiError::bad_request("`projectId` is required")),
    }
}

/// A priority given as a number or a numeric string, 1-10.
fn parse_priority(value: &Value) -> Result<Priority, ApiError> {
    let refused = || ApiError::bad_request(format!("`priority` must be an integer from 1 to 10, not {value}"));
    match value {
        Value::Number(n) => n.as_i64().ok_or_else(refused).and_then(|n| Priority::new(n).map_err(|_| refused())),
        Value::String(s) => s.parse::<Priority>().map_err(|_| refused()),
        Value::Null => Ok(Priority::DEFAULT),
        _ => Err(refused()),
    }
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
    }
}

/// Body of `POST /api/batch/add-images`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddImages {
    /// Owner of the batch.
    project_id: Option<String>,
    /// 1-10 (default 5), a number or a numeric string.
    #[serde(default)]
    priority: Value,
    /// The images.
    images: Vec<ImageUrl>,
}

/// One image of an [`AddImages`] request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageUrl {
    /// The caller's id for the image (a string or a number), kept on its outcome.
    #[serde(default)]
    record_id: Value,
    /// `http`/`https` URL the extract stage downloads.
    image_url: String,
}

/// `POST /api/batch/add-images`: a batch of images the extract stage downloads.
pub async fn add_images(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    body: Result<Json<AddImages>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(request) = body?;
    let project_id = required_project(request.project_id)?;
    let priority = parse_priority(&request.priority)?;
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
        let record_id = match image.record_id {
            Value::Null => None,
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            other => return Err(ApiError::bad_request(format!("images[{i}].recordId must be a string or number, not {other}"))),
        };
        images.push(RemoteImage { record_id, url: url.to_string() });
    }
    state.limiter.check(client.ip())?;
    let count = images.len();
    let batch_id = keys::new_batch_id(&project_id, &format!("{count} urls"));
    state.batches.submit_urls(batch_id.clone(), project_id, priority, images).await.map_err(refused)?;
    tracing::info!(batch = %batch_id, images = count, %client, "image URLs queued");
    Ok(batch_started(&batch_id, count, "{n} image(s) queued for download and face detection"))
}

async fn batch_or_404(state: &ApiState, batch_id: &str) -> Result<BatchSummary, ApiError> {
    if !keys::is_valid_id(batch_id) {
        return Err(ApiError::not_found(format!("no batch `{batch_id}`")));
    }
    state
        .db
        .batch_status(batch_id)
        .await
        .map_err(|e| ApiError::unavailable("PostgreSQL", e))?
        .ok_or_else(|| ApiError::not_found(format!("no batch `{batch_id}`")))
}

/// `GET /api/batch/status/{batch_id}`: the old shape, `batch.progress.{processed,total,failed}`.
pub async fn status(State(state): State<Arc<ApiState>>, Path(batch_id): Path<String>) -> Result<Json<Value>, ApiError> {
    let b = batch_or_404(&state, &batch_id).await?;
    Ok(Json(json!({
        "success": true,
        "batch": {
            "id": b.batch_id,
            // The old design's names, which its clients read.
            "batchId": b.batch_id,
            "imageCount": b.image_count,
            "queued": b.image_count.map(|n| (n - b.processed).max(0)),
            "projectId": b.project_id,
            "priority": b.priority,
            "status": b.status,
            "progress": { "processed": b.processed, "total": b.image_count, "failed": b.failed, "updatedAt": b.updated_at },
            "progressPercent": b.progress_percent,
            "facesFound": b.faces,
            "skipped": b.skipped,
            "error": b.error,
            "createdAt": b.created_at,
            "completedAt": b.completed_at,
        },
    })))
}

/// Query of `GET /api/batch/{batch_id}/results`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    /// 1-based page number.
    #[serde(default = "first_page")]
    page: i64,
    /// Images per page, 1-1000.
    #[serde(default = "default_page_size")]
    page_size: i64,
}

fn first_page() -> i64 {
    1
}
fn default_page_size() -> i64 {
    100
}

/// `GET /api/batch/{batch_id}/results?page=1&pageSize=100`: per-image outcomes in image order.
pub async fn results(
    State(state): State<Arc<ApiState>>,
    Path(batch_id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if page.page < 1 || !(1..=1000).contains(&page.page_size) {
        return Err(ApiError::bad_request("`page` must be at least 1 and `pageSize` 1-1000"));
    }
    let b = batch_or_404(&state, &batch_id).await?;
    let offset = (page.page - 1).saturating_mul(page.page_size);
    let rows = state
        .db
        .results_page(&batch_id, offset, page.page_size)
        .await
        .map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    let results: Vec<Value> = rows.iter().map(|r| result_json(&batch_id, r)).collect();
    Ok(Json(json!({
        "success": true,
        "batchId": batch_id,
        "status": b.status,
        "page": page.page,
        "pageSize": page.page_size,
        "total": b.image_count,
        "results": results,
    })))
}

fn result_json(batch_id: &str, r: &ImageResult) -> Value {
    let crops: Vec<Value> = r
        .crop_keys
        .iter()
        .map(|key| {
            let name = key.rsplit('/').next().unwrap_or(key);
            json!({ "key": key, "url": format!("/api/batch/{batch_id}/crops/{name}") })
        })
        .collect();
    json!({
        "imageId": r.image_id,
        "recordId": r.record_id,
        "entry": r.entry,
        "status": r.status,
        "width": r.width,
        "height": r.height,
        "faces": r.faces,
        "crops": crops,
        "detector": r.detector,
        "error": r.error,
        "failedStage": r.failed_stage,
        "attempts": r.attempts,
    })
}

/// `GET /api/batch/{batch_id}/crops/{name}`: one crop, as JPEG.
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
        Ok(bytes) => Ok(([(header::CONTENT_TYPE, "image/jpeg")], bytes)),
        Err(StoreError::NotFound(_)) => Err(ApiError::not_found(format!("no crop `{name}` in batch `{batch_id}`"))),
        Err(e) => Err(ApiError::unavailable("the object store", e)),
    }
}
