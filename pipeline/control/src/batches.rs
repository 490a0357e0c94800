//! The batch service: starting a batch and following it, written once for the
//! CLI (`pipeline submit`), the HTTP API (`upload-zip`, `add-images`) and bench.
//!
//! Starting a batch always happens in the same order, so its status is readable
//! the moment the caller gets its id and no batch waits for a job that was
//! never sent: the ZIP is stored (at [`keys::upload_key`]), the job is encoded
//! and checked against the server's `max_payload`, the batch row is recorded,
//! and only then is the job published (with the batch's message id, so a
//! repeated submission is stored once).

use std::path::Path;
use std::time::Duration;

use facepipe_core::domain::Priority;
use facepipe_core::keys;
use facepipe_core::messages::{ExtractJob, RemoteImage};
use facepipe_core::topology::Topology;
use facepipe_runtime::bus::{Bus, BusError};
use facepipe_ledger::{BatchSummary, Db, DbError};
use facepipe_runtime::store::{Store, StoreError};

/// Why a batch could not be started or followed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch id given is not one the pipeline accepts.
    #[error("invalid batch id `{0}`: use letters, digits, '-' or '_'")]
    InvalidId(String),
    /// The encoded job is larger than the server accepts (a long URL list).
    #[error("the job is {size} bytes, more than NATS's max_payload of {max}: send fewer images per request")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// The ZIP could not be stored.
    #[error("storing the ZIP: {0}")]
    Store(#[from] StoreError),
    /// The batch could not be recorded or read.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The job could not be published.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// No batch has this id.
    #[error("no batch `{0}`")]
    Unknown(String),
    /// The batch did not finish in time.
    #[error("batch {batch_id} did not finish within {waited:?}")]
    TimedOut {
        /// The batch.
        batch_id: String,
        /// How long was waited.
        waited: Duration,
    },
}

/// Where a new batch's ZIP comes from.
pub enum ZipUpload<'a> {
    /// A file on this machine, copied into the object store.
    File(&'a Path),
    /// An upload already spooled to a temporary file, moved into the object store.
    Spooled(tempfile::NamedTempFile),
}

/// A started batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Its id.
    pub batch_id: String,
    /// Bytes of ZIP stored (0 for a URL list).
    pub bytes: u64,
}

/// The batch service over one deployment's connections.
#[derive(Clone)]
pub struct Batches {
    topology: Topology,
    bus: Bus,
    db: Db,
    store: Store,
}

impl Batches {
    /// The service for `topology`, over connections the caller opened.
    pub fn new(topology: Topology, bus: Bus, db: Db, store: Store) -> Self {
        Self { topology, bus, db, store }
    }

    /// The batch id to use: `requested` when valid, else a new one from the project and source.
    pub fn batch_id(requested: Option<String>, project_id: &str, source: &str) -> Result<String, BatchError> {
        match requested {
            Some(id) if keys::is_valid_id(&id) => Ok(id),
            Some(id) => Err(BatchError::InvalidId(id)),
            None => Ok(keys::new_batch_id(project_id, source)),
        }
    }

    /// Stores the ZIP and starts a batch that unpacks it; `source` is recorded with the batch.
    pub async fn submit_zip(
        &self,
        batch_id: String,
        project_id: String,
        priority: Priority,
        zip: ZipUpload<'_>,
        source: &str,
    ) -> Result<Started, BatchError> {
        let key = keys::upload_key(&batch_id);
        let bytes = match zip {
            ZipUpload::File(path) => self.store.put_file(&key, path).await?,
            ZipUpload::Spooled(file) => self.store.put_spooled(&key, file).await?,
        };
        let job = ExtractJob::for_zip(Some(batch_id.clone()), project_id, priority, key);
        self.start(&job, source).await?;
        Ok(Started { batch_id, bytes })
    }

    /// Starts a batch that downloads `images`.
    pub async fn submit_urls(
        &self,
        batch_id: String,
        project_id: String,
        priority: Priority,
        images: Vec<RemoteImage>,
    ) -> Result<Started, BatchError> {
        let job = ExtractJob { batch_id: Some(batch_id.clone()), project_id, priority, zip: None, images, redrive: 0 };
        self.start(&job, &job.describe_source()).await?;
        Ok(Started { batch_id, bytes: 0 })
    }

    /// Checks the job's size, records the batch, then publishes the job.
    async fn start(&self, job: &ExtractJob, source: &str) -> Result<(), BatchError> {
        let batch_id = job.batch_id.as_deref().expect("the service's jobs carry their batch id");
        // Refused before anything is recorded, so no batch is left waiting for a job that never came.
        let payload = self.bus.job_payload(job).map_err(|e| match e {
            BusError::TooLarge { size, max } => BatchError::TooLarge { size, max },
            other => BatchError::Bus(other),
        })?;
        self.db.insert_batch(batch_id, job, source).await?;
        self.bus.publish_job_payload(&self.topology, job, payload).await?;
        Ok(())
    }

    /// The batch's summary, or `None` when it does not exist.
    pub async fn status(&self, batch_id: &str) -> Result<Option<BatchSummary>, BatchError> {
        Ok(self.db.batch_status(batch_id).await?)
    }

    /// Polls the batch every `poll` until it completes or fails, for at most `timeout`.
    pub async fn wait(&self, batch_id: &str, poll: Duration, timeout: Duration) -> Result<BatchSummary, BatchError> {
        follow(&self.db, batch_id, poll, Some(timeout), |_| {}).await
    }
}

/// Follows a batch until it finishes (completed or failed): reads it every `poll`,
/// hands each reading to `progress` (a progress bar, a log line), and returns the
/// last. Gives up after `timeout`; with none it waits as long as the batch runs,
/// and a batch that does not exist is an error at once (with a timeout it may yet
/// appear: a job published by hand is recorded when extract takes it). The one way
/// a caller waits for a batch: `pipeline submit --wait` and `watch`, bench, the tests.
pub async fn follow(
    db: &Db,
    batch_id: &str,
    poll: Duration,
    timeout: Option<Duration>,
    mut progress: impl FnMut(&BatchSummary),
) -> Result<BatchSummary, BatchError> {
    let started = tokio::time::Instant::now();
    loop {
        match db.batch_status(batch_id).await? {
            Some(summary) => {
                progress(&summary);
                if summary.status.is_finished() {
                    return Ok(summary);
                }
            }
            None if timeout.is_none() => return Err(BatchError::Unknown(batch_id.to_string())),
            None => {}
        }
        if let Some(timeout) = timeout.filter(|t| started.elapsed() > *t) {
            return Err(BatchError::TimedOut { batch_id: batch_id.to_string(), waited: timeout });
        }
        tokio::time::sleep(poll).await;
    }
}
