//! Reading a batch's per-image outcomes: pages by key, and a stream over a
//! server-side cursor, so neither costs more as a batch grows to millions of
//! images.

use futures::{pin_mut, TryStreamExt};
use serde::Serialize;

use facepipe_core::domain::{Detector, ImageStatus, StageName};
use facepipe_core::keys;
use facepipe_core::messages::FaceBox;

use crate::error::DbError;
use crate::pool::Db;

/// One image's recorded outcome, as `pipeline results` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageResult {
    /// Image id.
    pub image_id: String,
    /// Name of the ZIP entry, or the image's URL.
    pub entry: String,
    /// The caller's id for an image given by URL.
    pub record_id: Option<String>,
    /// `pending` until its outcome is recorded.
    pub status: ImageStatus,
    /// Upright original width.
    pub width: Option<i32>,
    /// Upright original height.
    pub height: Option<i32>,
    /// Face boxes in original pixels.
    pub faces: Vec<FaceBox>,
    /// Crop object keys.
    pub crop_keys: Vec<String>,
    /// Original object key.
    pub original_key: Option<String>,
    /// Detector used.
    pub detector: Option<Detector>,
    /// Failure reason.
    pub error: Option<String>,
    /// Stage that failed.
    pub failed_stage: Option<StageName>,
    /// Delivery attempts.
    pub attempts: i32,
}

/// Where a page of results starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStart {
    /// After this many images, in image-id order (page numbers). Image ids are
    /// dense, so this is as cheap as a key: the start is `keys::image_id(n)`.
    Offset(i64),
    /// After this image id: the cursor a previous page ended on (an index seek).
    After(String),
}

impl ImageResult {
    /// The columns [`ImageResult::from_row`] reads, in its order.
    pub const COLUMNS: &str = "image_id, entry_name, status, width, height, faces, crop_keys, original_key,
                       detector, error, failed_stage, attempts, record_id";

    /// An image row, selected with [`ImageResult::COLUMNS`].
    pub fn from_row(r: &tokio_postgres::Row) -> Result<Self, DbError> {
        Ok(Self {
            image_id: r.get(0),
            entry: r.get(1),
            status: r.get::<_, &str>(2).parse()?,
            width: r.get(3),
            height: r.get(4),
            faces: serde_json::from_value(r.get(5)).unwrap_or_default(),
            crop_keys: r.get(6),
            original_key: r.get(7),
            detector: r.get::<_, Option<&str>>(8).map(str::parse).transpose()?,
            error: r.get(9),
            failed_stage: r.get::<_, Option<&str>>(10).map(str::parse).transpose()?,
            attempts: r.get(11),
            record_id: r.get(12),
        })
    }
}

/// Runs one page of a keyed read (`... ORDER BY <index order> LIMIT n`) with bitmap
/// scans and sorts ruled out, so PostgreSQL walks the index in order and stops at
/// the limit. Left to itself, it may believe a new batch (an id its statistics have
/// never seen) holds a few dozen rows, and read and sort the whole rest of the batch
/// for every page: 15 ms a page at 100,000 images, and more with each image.
pub async fn ordered_page(
    client: &mut deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, DbError> {
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute("SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off").await?;
    let rows = tx.query(sql, params).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Rows fetched per round trip when streaming: bounded memory, few round trips.
const STREAM_CHUNK: i32 = 1000;


impl Db {
    /// Every image of a batch with its outcome, in image-id order, in memory
    /// (tests and small batches; [`Db::for_each_result`] streams).
    pub async fn results(&self, batch_id: &str) -> Result<Vec<ImageResult>, DbError> {
        let mut all = Vec::new();
        self.for_each_result(batch_id, |r| {
            all.push(r);
            Ok::<_, DbError>(())
        })
        .await?;
        Ok(all)
    }

    /// At most `limit` images of a batch from `start` on, in image-id order: one
    /// index seek, wherever the page is.
    pub async fn results_page(&self, batch_id: &str, start: &PageStart, limit: i64) -> Result<Vec<ImageResult>, DbError> {
        let mut client = self.pool.get().await?;
        let (op, key) = match start {
            // Image ids are dense (the n-th image is `keys::image_id(n)`), so the n-th
            // image's key is known without counting the n before it.
            PageStart::Offset(skip) => (">=", keys::image_id(usize::try_from(*skip).unwrap_or(0))),
            PageStart::After(key) => (">", key.clone()),
        };
        let sql = format!("SELECT {} FROM images WHERE batch_id = $1 AND image_id {op} $2 ORDER BY image_id LIMIT $3", ImageResult::COLUMNS);
        let rows = ordered_page(&mut client, &sql, &[&batch_id, &key, &limit]).await?;
        rows.iter().map(ImageResult::from_row).collect()
    }

    /// Calls `f` on every image of a batch, in image-id order (see [`Db::read_in_chunks`]).
    pub async fn for_each_result<E: From<DbError>>(
        &self,
        batch_id: &str,
        mut f: impl FnMut(ImageResult) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_in_chunks(batch_id, |chunk| {
            let done = chunk.into_iter().try_for_each(&mut f);
            async move { done.map(|()| true) }
        })
        .await
    }

    /// Sends every image of a batch to `chunks`, [`STREAM_CHUNK`] at a time, in
    /// image-id order (see [`Db::read_in_chunks`]); a failed read sends its error
    /// last. A full channel holds the read back; a dropped receiver ends it early.
    pub async fn send_results(&self, batch_id: &str, chunks: &tokio::sync::mpsc::Sender<Result<Vec<ImageResult>, DbError>>) {
        let read = self
            .read_in_chunks(batch_id, |chunk| {
                let chunks = chunks.clone();
                async move { Ok::<_, DbError>(chunks.send(Ok(chunk)).await.is_ok()) }
            })
            .await;
        if let Err(e) = read {
            let _ = chunks.send(Err(e)).await;
        }
    }

    /// Reads every image of a batch through a server-side cursor, [`STREAM_CHUNK`]
    /// rows at a time, and hands each chunk to `on_chunk`, which answers whether to
    /// go on. Memory stays the same whatever the batch's size, and the one sorted
    /// read costs the same whatever the planner believes about a batch it has no
    /// statistics for yet (keyed pages would each be planned again, and with a new
    /// batch's id unknown to the statistics, each could scan the rest of the batch).
    /// The rows are one consistent snapshot.
    async fn read_in_chunks<E: From<DbError>, F: std::future::Future<Output = Result<bool, E>>>(
        &self,
        batch_id: &str,
        mut on_chunk: impl FnMut(Vec<ImageResult>) -> F,
    ) -> Result<(), E> {
        let mut client = self.pool.get().await.map_err(DbError::from)?;
        // A portal (a cursor) lives in a transaction; read-only, it holds no locks that matter.
        let tx = client.build_transaction().read_only(true).start().await.map_err(DbError::from)?;
        let statement = tx
            .prepare(&format!("SELECT {} FROM images WHERE batch_id = $1 ORDER BY image_id", ImageResult::COLUMNS))
            .await
            .map_err(DbError::from)?;
        let portal = tx.bind(&statement, &[&batch_id]).await.map_err(DbError::from)?;
        loop {
            let rows = tx.query_portal_raw(&portal, STREAM_CHUNK).await.map_err(DbError::from)?;
            pin_mut!(rows);
            let mut chunk = Vec::with_capacity(STREAM_CHUNK as usize);
            while let Some(row) = rows.try_next().await.map_err(DbError::from)? {
                chunk.push(ImageResult::from_row(&row)?);
            }
            let last = chunk.len() < STREAM_CHUNK as usize;
            if !on_chunk(chunk).await? || last {
                break;
            }
        }
        tx.commit().await.map_err(DbError::from)?;
        Ok(())
    }
}
