//! # extract: a ZIP, or a list of image URLs -> one original per image in the
//! object store -> one detect job per image; records the batch and its image count.
//!
//! A blocking thread reads the archive entry by entry into a small channel (or
//! `parallelism` downloads run at once); the async side stores, registers and
//! publishes entries a chunk at a time, so memory stays bounded by
//! `parallelism` entries whatever the batch's size.
//!
//! ## Layout
//! - [`address`]: which addresses an image URL may reach (globally reachable ones only).
//! - [`download`]: fetching images given by URL, with time, size, redirect and address limits.
//! - this file: the [`Extract`] handler, which stores, registers and publishes entries.

pub mod address;
pub mod download;

use std::path::PathBuf;

use facepipe_core::keys::{self, MessageKind};
use facepipe_core::domain::{Priority, StageName};
use facepipe_core::messages::{self, DetectJob, ExtractJob, ExtractSource, ImageRef, Outcome, RemoteImage};
use facepipe_ledger::{Db, NewImage};
use facepipe_runtime::store::ObjectReader;
use facepipe_runtime::{Ctx, Delivery, Failed, Handled, Handler, StageError};
use futures::StreamExt;

use facepipe_archive as archive;
use facepipe_archive::Entry;
use crate::download::Downloader;

/// The extract stage's handler.
pub struct Extract {
    /// Where batches and images are recorded.
    pub db: Db,
}

impl Handler for Extract {
    type Input = ExtractJob;

    async fn ready(&self, ctx: &Ctx) -> Result<(), String> {
        ctx.check_streams().await?;
        self.db.ping().await.map_err(|e| format!("PostgreSQL does not answer: {e}"))?;
        ctx.store.ping().await.map_err(|e| format!("the object store does not answer: {e}"))
    }

    async fn handle(&self, ctx: &Ctx, job: ExtractJob, delivery: Delivery) -> Result<Handled, StageError> {
        let batch_id = batch_id(&job, delivery.stream_sequence, &delivery.published)?;
        let source = job.source().map_err(StageError::permanent)?;
        self.db.insert_batch(&batch_id, &job, &job.describe_source()).await?;
        match source {
            ExtractSource::Zip(zip) => self.unpack(ctx, zip, &batch_id, job.priority).await?,
            ExtractSource::Urls(images) => self.download(ctx, images, &batch_id, job.priority).await?,
        }
        Ok(Handled::Done)
    }

    /// A job that failed for good (an unreadable archive, retries exhausted, or a
    /// worker that crashed on every delivery) fails its batch, with the reason.
    async fn on_dead_letter(&self, _: &Ctx, failed: &Failed<'_>) -> Result<(), StageError> {
        let Ok(job) = messages::decode::<ExtractJob>(failed.payload) else { return Ok(()) };
        let Ok(batch_id) = batch_id(&job, failed.stream_sequence, &failed.published) else { return Ok(()) };
        self.db.insert_batch(&batch_id, &job, &job.describe_source()).await?;
        Ok(self.db.fail_batch(&batch_id, &failed.error.message()).await?)
    }
}

/// The job's batch id, or one derived from the job message itself (its stream
/// sequence and publish time), so every redelivery names the same batch.
fn batch_id(job: &ExtractJob, stream_sequence: u64, published: &str) -> Result<String, StageError> {
    match &job.batch_id {
        Some(id) if keys::is_valid_id(id) => Ok(id.clone()),
        Some(id) => Err(StageError::permanent(format!("invalid batch_id `{id}`: use letters, digits, '-' or '_'"))),
        None => Ok(keys::derived_batch_id(&[&job.project_id, &job.describe_source(), &stream_sequence.to_string(), published])),
    }
}

impl Extract {
    async fn unpack(&self, ctx: &Ctx, zip: &str, batch_id: &str, priority: Priority) -> Result<(), StageError> {
        // Two readers of the archive: its central directory and its entries, each read in order.
        let (directory, bodies) = (locate(ctx, zip).await?, locate(ctx, zip).await?);
        let params = ctx.current().stages.extract.params.clone();
        let parallelism = params.parallelism;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Entry>(parallelism);
        let reader = tokio::task::spawn_blocking(move || {
            archive::read_entries(directory, bodies, &params, |entry| tx.blocking_send(entry).is_ok())
        });

        let entries = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut chunks = entries.ready_chunks(parallelism);
        let mut published = 0usize;
        while let Some(chunk) = chunks.next().await {
            published += self.ingest_chunk(ctx, batch_id, priority, chunk, &[]).await?;
        }
        let summary = reader
            .await
            .map_err(|e| StageError::transient(format!("archive reader failed: {e}")))?
            .map_err(|e| match e {
                archive::ArchiveError::Io(io) if io.kind() != std::io::ErrorKind::NotFound => StageError::transient(io),
                other => StageError::permanent(other),
            })?;
        let completed = self.db.finish_ingest(batch_id, summary.images, &summary.skipped).await?;
        tracing::info!(
            batch = batch_id, images = summary.images, skipped = summary.skipped.len(), published, completed,
            "archive unpacked"
        );
        Ok(())
    }

    /// Downloads each image URL (a failed download fails that image alone, with
    /// its reason) and ingests them like archive entries; image `n` is URL `n`.
    async fn download(&self, ctx: &Ctx, images: &[RemoteImage], batch_id: &str, priority: Priority) -> Result<(), StageError> {
        let params = ctx.current().stages.extract.params.clone();
        let parallelism = params.parallelism;
        // Per job, so download limits changed live apply to the next job.
        let downloader = Downloader::new(&params).map_err(|e| StageError::transient(format!("HTTP client: {e}")))?;
        let downloader = &downloader;
        let mut published = 0usize;
        for (chunk_start, chunk) in (0..).step_by(parallelism).zip(images.chunks(parallelism)) {
            let fetches = chunk.iter().enumerate().map(|(i, image)| async move {
                let index = chunk_start + i;
                let name = image.url.clone();
                // A redelivered job does not download again what it already stored.
                if ctx.store.exists(&original_key(batch_id, &keys::image_id(index), &name, true)).await? {
                    // No bytes needed: ingest_chunk writes only objects that do not exist yet.
                    return Ok(Entry::Image { index, name, bytes: Vec::new() });
                }
                Ok::<_, StageError>(match downloader.fetch(&image.url).await {
                    Ok(bytes) => Entry::Image { index, name, bytes: bytes.into() },
                    Err(e) => Entry::Unreadable { index, name, reason: e.to_string() },
                })
            });
            let entries = futures::future::try_join_all(fetches).await?;
            published += self.ingest_chunk(ctx, batch_id, priority, entries, images).await?;
        }
        let completed = self.db.finish_ingest(batch_id, images.len(), &[]).await?;
        tracing::info!(batch = batch_id, images = images.len(), published, completed, "image URLs downloaded");
        Ok(())
    }

    /// Stores a chunk of entries, registers them, then publishes one message per image.
    /// Rows exist before any message that could reach persist is published.
    /// `remote` is the job's URL list (empty for a ZIP): it gives each image its record id.
    async fn ingest_chunk(
        &self,
        ctx: &Ctx,
        batch_id: &str,
        priority: Priority,
        chunk: Vec<Entry>,
        remote: &[RemoteImage],
    ) -> Result<usize, StageError> {
        let record_id = |index: usize| remote.get(index).and_then(|r| r.record_id.clone());
        let from_url = !remote.is_empty();
        let mut rows = Vec::new();
        let mut images = Vec::new();
        let mut failures = Vec::new();
        for entry in chunk {
            match entry {
                Entry::Image { index, name, bytes } => {
                    let image_id = keys::image_id(index);
                    let key = original_key(batch_id, &image_id, &name, from_url);
                    let record_id = record_id(index);
                    rows.push(NewImage { image_id: image_id.clone(), entry_name: name, original_key: key.clone(), record_id, error: None });
                    images.push((image_id, key, bytes::Bytes::from(bytes)));
                }
                Entry::Unreadable { index, name, reason } => {
                    let image_id = keys::image_id(index);
                    let record_id = record_id(index);
                    rows.push(NewImage { image_id: image_id.clone(), entry_name: name, original_key: String::new(), record_id, error: Some(reason.clone()) });
                    failures.push((image_id, reason));
                }
                Entry::Skipped { name } => tracing::debug!(entry = %name, "skipped non-image entry"),
            }
        }
        // A redelivered job (its worker was killed) skips what it already stored, so
        // every attempt gets further than the last. Object writes are atomic.
        let stores = images.iter().map(|(_, key, bytes)| async move {
            if !ctx.store.exists(key).await? {
                ctx.store.put(key, bytes.clone()).await?;
            }
            Ok::<(), StageError>(())
        });
        for stored in futures::future::join_all(stores).await {
            stored?;
        }
        self.db.insert_images(batch_id, &rows).await?;
        // A job published again (redelivered, or re-driven after the broker lost it)
        // sends on only the images still without an outcome.
        let ids: Vec<&str> = rows.iter().map(|r| r.image_id.as_str()).collect();
        let done = self.db.final_among(batch_id, &ids).await?;
        images.retain(|(image_id, _, _)| !done.contains(image_id));
        failures.retain(|(image_id, _)| !done.contains(image_id));

        let image_ref =
            |image_id: &str| ImageRef::new(batch_id, image_id, priority);
        let detect_jobs = images.iter().map(|(image_id, key, _)| async move {
            let job = DetectJob { image: image_ref(image_id), key: key.clone() };
            ctx.publish_next(MessageKind::DetectJob, &job.image, &job).await
        });
        let failed_outcomes = failures.iter().map(|(image_id, reason)| async move {
            let outcome = Outcome::failed(image_ref(image_id), StageName::Extract, reason.clone(), 1);
            ctx.publish_outcome(&keys::msg_id(MessageKind::Failure, batch_id, image_id), &outcome).await
        });
        for published in futures::future::join_all(detect_jobs).await {
            published?;
        }
        for published in futures::future::join_all(failed_outcomes).await {
            published?;
        }
        Ok(images.len())
    }
}

/// An original's object key. A URL's extension is read from its path, without
/// the query or fragment; an archive entry's name is used whole (`#` and `?` are
/// ordinary characters in file names).
fn original_key(batch_id: &str, image_id: &str, name: &str, from_url: bool) -> String {
    if !from_url {
        return keys::original_key(batch_id, image_id, name);
    }
    let without_query = name.split(['?', '#']).next().unwrap_or(name);
    let path = without_query.split_once("://").map_or(without_query, |(_, rest)| rest.split_once('/').map_or("", |(_, p)| p));
    keys::original_key(batch_id, image_id, path)
}

/// Opens the ZIP where it is: a local path (`/x.zip`, `file:///x.zip`), or an
/// object-store key (read in place: the file of a `file://` store, ranged GETs
/// of a remote one; never downloaded whole).
async fn locate(ctx: &Ctx, zip: &str) -> Result<ObjectReader, StageError> {
    let local = zip.strip_prefix("file://").or_else(|| zip.starts_with('/').then_some(zip));
    match local {
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_file() {
                ObjectReader::file(&path).map_err(StageError::transient)
            } else {
                Err(StageError::permanent(format!("ZIP `{}` not found on this host", path.display())))
            }
        }
        None => Ok(ctx.store.reader(zip).await?),
    }
}
