//! What the dashboard reads: batches newest first, a batch's failures grouped by
//! reason, its images of one status, and one image. Each is one index-backed
//! query, so none costs more as the tables grow. They live here, with their one
//! user, on a connection from the ledger's pool.

use facepipe_core::domain::{BatchStatus, ImageStatus, StageName};

use facepipe_ledger::{ordered_page, BatchSummary, Db, DbError, ImageResult};

/// Which batches [`list_batches`] returns.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    /// Only this project's.
    pub project: Option<String>,
    /// Only batches in this state.
    pub status: Option<BatchStatus>,
    /// Only batches older than this cursor (a previous page's [`BatchPage::next_before`]).
    pub before: Option<BatchCursor>,
    /// Most batches in the page.
    pub limit: i64,
}

/// One page of batches, newest first.
#[derive(Debug, Clone)]
pub struct BatchPage {
    /// The batches.
    pub batches: Vec<BatchSummary>,
    /// Pass as [`BatchFilter::before`] for the next page; none when this page reached the end.
    pub next_before: Option<BatchCursor>,
}

/// Images of one batch that failed at one stage for one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    /// The stage that gave up (none for failures recorded before stages were named).
    pub stage: Option<StageName>,
    /// The recorded error.
    pub reason: String,
    /// How many images.
    pub count: i64,
    /// The first such image, to look at.
    pub example: String,
}

/// Most failure groups returned for one batch: reasons are few, unless each
/// error text names its image, and then the biggest groups are the useful ones.
const MAX_FAILURE_GROUPS: i64 = 100;

/// Where a page of batches ends: the last batch's creation time and id, so batches
/// created in the same microsecond still page in a fixed order. Written as
/// `<microseconds>.<batch id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchCursor {
    created_at: chrono::DateTime<chrono::Utc>,
    batch_id: String,
}

impl BatchCursor {
    fn after(b: &BatchSummary) -> Self {
        Self { created_at: b.created_at, batch_id: b.batch_id.clone() }
    }
}

impl std::fmt::Display for BatchCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at.timestamp_micros(), self.batch_id)
    }
}

/// A cursor [`BatchCursor`]'s `Display` did not write.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a batch cursor (pass a page's nextBefore)")]
pub struct BadCursor(pub String);

impl std::str::FromStr for BatchCursor {
    type Err = BadCursor;

    fn from_str(cursor: &str) -> Result<Self, BadCursor> {
        let bad = || BadCursor(cursor.to_string());
        let (micros, id) = cursor.split_once('.').ok_or_else(bad)?;
        let created_at = chrono::DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
        Ok(Self { created_at, batch_id: id.to_string() })
    }
}

/// Batches newest first, filtered, one page from `filter.before` on (an index
/// seek on `(created_at, batch_id)`, however deep the page is).
pub async fn list_batches(db: &Db, filter: &BatchFilter) -> Result<BatchPage, DbError> {
    let (before_at, before_id) = filter.before.as_ref().map(|c| (c.created_at, c.batch_id.as_str())).unzip();
    let status = filter.status.map(|s| s.as_str());
    let client = db.client().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM batches
                     WHERE ($1::text IS NULL OR project_id = $1)
                       AND ($2::text IS NULL OR status = $2)
                       AND ($3::timestamptz IS NULL OR (created_at, batch_id) < ($3, $4::text))
                     ORDER BY created_at DESC, batch_id DESC LIMIT $5",
                BatchSummary::COLUMNS
            ),
            &[&filter.project, &status, &before_at, &before_id, &filter.limit],
        )
        .await?;
    let batches = rows.iter().map(BatchSummary::from_row).collect::<Result<Vec<_>, _>>()?;
    let next_before = (batches.len() as i64 == filter.limit).then(|| batches.last().map(BatchCursor::after)).flatten();
    Ok(BatchPage { batches, next_before })
}

/// A batch's failed images grouped by stage and error, biggest groups first.
pub async fn failure_groups(db: &Db, batch_id: &str) -> Result<Vec<FailureGroup>, DbError> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT failed_stage, coalesce(error, ''), count(*), min(image_id) FROM images
                 WHERE batch_id = $1 AND status = 'failed'
                 GROUP BY 1, 2 ORDER BY 3 DESC, 2 LIMIT $2",
            &[&batch_id, &MAX_FAILURE_GROUPS],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(FailureGroup {
                stage: r.get::<_, Option<&str>>(0).map(str::parse).transpose()?,
                reason: r.get(1),
                count: r.get(2),
                example: r.get(3),
            })
        })
        .collect()
}

/// At most `limit` images of a batch in state `status`, after image `after`, in image order.
pub async fn results_with_status(
    db: &Db,
    batch_id: &str,
    status: ImageStatus,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<ImageResult>, DbError> {
    let mut client = db.client().await?;
    let sql = format!(
        "SELECT {} FROM images WHERE batch_id = $1 AND status = $2 AND image_id > $3 ORDER BY image_id LIMIT $4",
        ImageResult::COLUMNS
    );
    let rows = ordered_page(&mut client, &sql, &[&batch_id, &status.as_str(), &after.unwrap_or(""), &limit]).await?;
    rows.iter().map(ImageResult::from_row).collect()
}

/// One image of a batch with its outcome, or `None`.
pub async fn image(db: &Db, batch_id: &str, image_id: &str) -> Result<Option<ImageResult>, DbError> {
    let client = db.client().await?;
    let sql = format!("SELECT {} FROM images WHERE batch_id = $1 AND image_id = $2", ImageResult::COLUMNS);
    let row = client.query_opt(&sql, &[&batch_id, &image_id]).await?;
    row.as_ref().map(ImageResult::from_row).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = chrono::DateTime::from_timestamp_micros(1_765_000_000_123_456).unwrap();
        let cursor: BatchCursor = "1765000000123456.proj-a.b".parse().unwrap();
        assert_eq!(
            cursor,
            BatchCursor { created_at: at, batch_id: "proj-a.b".into() },
            "the id may hold dots; the time never does"
        );
        assert_eq!(cursor.to_string(), "1765000000123456.proj-a.b");
        for bad in ["", "x.y", "12", ".id"] {
            assert!(bad.parse::<BatchCursor>().is_err(), "{bad}");
        }
    }
}
