//! `GET /api/batch/{batchId}/export?format=jsonl|csv`: every outcome of a batch as
//! one download. A task reads the batch through a server-side cursor (one sorted
//! read, whatever the batch's size) and hands its rows over, a thousand at a time,
//! through a short channel: a slow client holds the read back instead of the
//! server buffering it, and a million images cost no more memory than a thousand.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{ApiError, ApiState};
use crate::batches::batch_or_404;
use crate::wire::ImageView;
use facepipe_ledger::{DbError, ImageResult};

/// Chunks of rows in flight between the reading task and the client.
const CHUNKS_IN_FLIGHT: usize = 2;

/// The export's file format.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON Lines: one image per line, shaped as in `results`.
    Jsonl,
    /// CSV with a header row; faces as `x y w h score` separated by `;`, crops by spaces.
    Csv,
}

/// Query of the export.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// jsonl or csv.
    #[param(inline)]
    format: Format,
}

/// Every outcome of a batch as one file, in image order.
///
/// `GET /api/batch/{batchId}/export?format=jsonl` (one `results` image per line) or
/// `format=csv`. Streamed; a download of a batch still running holds the images
/// recorded so far and `pending` for the rest.
#[utoipa::path(
    get,
    path = "/api/batch/{batchId}/export",
    operation_id = "batchExport",
    tag = "batches",
    params(("batchId" = String, Path, description = "The batch id."), ExportQuery),
    responses(
        (status = 200, description = "The outcomes, as an attachment.",
         content((String = "application/jsonl"), (String = "text/csv"))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn export(
    State(state): State<Arc<ApiState>>,
    Path(batch_id): Path<String>,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(ExportQuery { format }) = query?;
    batch_or_404(&state, &batch_id).await?;
    let (media_type, extension) = match format {
        Format::Jsonl => ("application/jsonl", "jsonl"),
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
    };
    let disposition = format!("attachment; filename=\"{batch_id}.{extension}\"");
    let (sender, mut receiver) = mpsc::channel::<Result<Vec<ImageResult>, DbError>>(CHUNKS_IN_FLIGHT);
    let read_batch = batch_id.clone();
    tokio::spawn(async move { state.db.send_results(&read_batch, &sender).await });
    let mut header_row = matches!(format, Format::Csv).then(|| csv_row(&CSV_HEADER.map(String::from)));
    let body = futures::stream::poll_fn(move |cx| {
        receiver.poll_recv(cx).map(|chunk| {
            chunk.map(|rows| {
                let rows = rows.map_err(|e| {
                    // The client sees a truncated transfer.
                    tracing::warn!(batch = %batch_id, error = %e, "export stopped early");
                    std::io::Error::other(e)
                })?;
                let mut out = header_row.take().unwrap_or_default();
                for row in rows {
                    let view = ImageView::new(&batch_id, row);
                    match format {
                        Format::Jsonl => {
                            serde_json::to_writer(&mut out, &view).expect("an image serializes");
                            out.push(b'\n');
                        }
                        Format::Csv => out.extend_from_slice(&csv_row(&csv_fields(&view))),
                    }
                }
                Ok::<_, std::io::Error>(Bytes::from(out))
            })
        })
    });
    Ok(([(header::CONTENT_TYPE, media_type.to_string()), (header::CONTENT_DISPOSITION, disposition)], Body::from_stream(body)))
}

/// The CSV columns.
const CSV_HEADER: [&str; 12] =
    ["imageId", "recordId", "entry", "status", "width", "height", "faces", "boxes", "crops", "detector", "failedStage", "error"];

fn csv_fields(v: &ImageView) -> [String; 12] {
    let opt = |n: Option<i32>| n.map(|n| n.to_string()).unwrap_or_default();
    let boxes: Vec<String> = v.faces.iter().map(|f| format!("{} {} {} {} {:.3}", f.x, f.y, f.w, f.h, f.score)).collect();
    let crops: Vec<&str> = v.crops.iter().map(|c| c.key.as_str()).collect();
    [
        v.image_id.clone(),
        v.record_id.clone().unwrap_or_default(),
        v.entry.clone(),
        v.status.as_str().to_string(),
        opt(v.width),
        opt(v.height),
        v.faces.len().to_string(),
        boxes.join(";"),
        crops.join(" "),
        v.detector.map(|d| d.to_string()).unwrap_or_default(),
        v.failed_stage.map(|s| s.to_string()).unwrap_or_default(),
        v.error.clone().unwrap_or_default(),
    ]
}

/// One CSV record, safe to open in a spreadsheet: every cell quoted (by the `csv`
/// crate), and a cell a spreadsheet would read as a formula made text (OWASP's rule for
/// CSV injection): entry names, record ids and error texts come from whoever made the
/// batch, and `=cmd|' /C calc'!A0` in one would run in whoever opens the export.
fn csv_row(fields: &[String]) -> Vec<u8> {
    let mut writer = csv::WriterBuilder::new().quote_style(csv::QuoteStyle::Always).from_writer(Vec::new());
    writer.write_record(fields.iter().map(|f| spreadsheet_safe(f).into_owned())).expect("writing to memory");
    writer.into_inner().expect("writing to memory")
}

/// `cell`, or `'` + `cell` when it starts with a character a spreadsheet reads as the
/// start of a formula (`=`, `+`, `-`, `@`) or that can smuggle one (tab, carriage return).
fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_cell_is_quoted_and_formulas_are_made_text() {
        let row = super::csv_row(&["a".into(), "b,c".into(), "say \"hi\"".into(), String::new()]);
        assert_eq!(String::from_utf8(row).unwrap(), "\"a\",\"b,c\",\"say \"\"hi\"\"\",\"\"\n");
        for (cell, safe) in [
            ("=cmd|' /C calc'!A0.jpg", "'=cmd|' /C calc'!A0.jpg"),
            ("+SUM(1+1)*cmd|a.jpg", "'+SUM(1+1)*cmd|a.jpg"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "'\r=1"),
            ("photo=1.jpg", "photo=1.jpg"),
        ] {
            assert_eq!(super::spreadsheet_safe(cell), safe);
        }
    }
}
