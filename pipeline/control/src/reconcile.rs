//! The reconciler: PostgreSQL is the ledger, the broker only transport. Every image
//! is recorded from the moment extract registers it; when the broker loses messages
//! (a purged stream, limits that discard, a server back with an empty store, an
//! acknowledged write it never synced), the images they carried stay `pending` with
//! nothing left to move them. The reconciler finds them and publishes their jobs again.
//!
//! Waiting is not stalling: a batch behind a deep backlog has its messages in the
//! streams, and the per-batch subjects' counts say so in one request per stage, so
//! it is left alone however long it waits. A batch is *stalled* when images of it are
//! pending and no stage's stream holds anything of it (nor anything on a plain
//! subject, whose batch cannot be told). A stalled batch is marked, which its status
//! shows at once; once it has stayed unchanged for `reconcile.stalled_after` its
//! pending images are re-driven: each gets a detect job again (or, for an entry that
//! could not be read, its recorded failure), under a message id of its own generation
//! so JetStream's duplicate window does not drop it; a batch still ingesting gets its
//! recorded extract job again, which resumes without registering an entry twice. If
//! the original was only slow, the stages' idempotent effects absorb the duplicate:
//! the first outcome recorded wins, and crops keep their deterministic keys.
//!
//! One process runs it at a time in a deployment (a PostgreSQL advisory lock): persist
//! runs [`run`] in each of its processes and one holds the lock; `pipeline reconcile`
//! runs [`reconcile_once`].


use facepipe_core::domain::{BatchStatus, StageName};
use facepipe_core::keys::{self, MessageKind};
use facepipe_core::messages::{self, DetectJob, ImageRef, Outcome};
use facepipe_core::telemetry;
use facepipe_core::topology::Topology;
use facepipe_ledger::{ActiveBatch, Db, DbError};
use facepipe_runtime::bus::{Bus, BusError, Queued};
use tokio_util::sync::CancellationToken;

/// Key of the advisory lock that keeps two reconcilers from working at once.
pub const RECONCILE_LOCK: i64 = 0x6661_6365_7265_636f; // "facereco"

/// Batches read per page, and pending images per page of a re-drive.
const PAGE: i64 = 1000;

/// Why a reconciliation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// PostgreSQL did not answer.
    #[error(transparent)]
    Db(#[from] DbError),
    /// JetStream did not answer, or a stage's stream is missing (`pipeline apply` recreates it).
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What one look found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// False when another process holds the reconciler's lock: nothing was looked at.
    pub ran: bool,
    /// Batches still ingesting or processing.
    pub active: usize,
    /// Stalled batches: images pending, nothing of them in any stream.
    pub stalled: Vec<Stalled>,
    /// Images whose detect job was published again.
    pub redriven_images: u64,
    /// Images recorded as failed from the reason extract kept (their failure was lost on its way).
    pub recorded_failures: u64,
    /// Extract jobs published again.
    pub redriven_jobs: u64,
}

/// A stalled batch, as one look saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stalled {
    /// The batch.
    pub batch_id: String,
    /// Ingesting or processing.
    pub status: BatchStatus,
    /// Images without an outcome (unknown while ingesting: 0).
    pub pending: i64,
    /// Whether an earlier look had found it stalled already.
    pub marked: bool,
    /// Whether this look re-drove it (else it waits for `stalled_after`, or it was a dry run).
    pub redriven: bool,
}

/// What a look may do: act, or only say what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Mark stalled batches and re-drive those stalled long enough.
    Act,
    /// Change nothing; report what [`Mode::Act`] would mark and re-drive.
    DryRun,
}

/// One look, under the reconciler's lock (none taken for a dry run); `ran` is false
/// when another process holds it.
pub async fn reconcile_once(bus: &Bus, db: &Db, topology: &Topology, mode: Mode) -> Result<Report, ReconcileError> {
    let lock = match mode {
        Mode::Act => match db.try_lock(RECONCILE_LOCK).await? {
            Some(lock) => Some(lock),
            None => return Ok(Report::default()),
        },
        Mode::DryRun => None,
    };
    let report = look(bus, db, topology, mode).await?;
    drop(lock);
    Ok(report)
}

/// Runs the reconciler every `reconcile.every` until `stop` is cancelled, in whichever
/// process holds its lock (the others try again at each turn).
pub async fn run(bus: Bus, db: Db, topology: Topology, stop: CancellationToken) {
    let every = topology.reconcile.every;
    let mut held = None;
    loop {
        if held.is_none() {
            held = match db.try_lock(RECONCILE_LOCK).await {
                Ok(lock) => lock,
                Err(e) => {
                    tracing::debug!(error = %facepipe_core::error::chain(&e), "reconciler: PostgreSQL unavailable");
                    None
                }
            };
            if held.is_some() {
                tracing::info!(every = ?every, stalled_after = ?topology.stalled_after(), "reconciler: this process reconciles");
            }
        }
        if let Some(lock) = &held {
            // A lock whose connection broke is no lock: take it again next turn.
            if lock.check().await.is_err() {
                held = None;
            } else if let Err(e) = look(&bus, &db, &topology, Mode::Act).await {
                tracing::warn!(error = %facepipe_core::error::chain(&e), "reconciler: could not look; trying again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// What every stage's stream holds, in one pass over the four.
async fn queued(bus: &Bus, topology: &Topology) -> Result<Vec<Queued>, BusError> {
    let mut out = Vec::new();
    for stage in StageName::ALL {
        out.push(bus.queued(topology, stage).await?);
    }
    Ok(out)
}

async fn look(bus: &Bus, db: &Db, topology: &Topology, mode: Mode) -> Result<Report, ReconcileError> {
    let streams = queued(bus, topology).await?;
    let plain: u64 = streams.iter().map(|q| q.plain).sum();
    let of_batch = |batch: &str| streams.iter().filter_map(|q| q.by_batch.get(batch)).sum::<u64>();
    let stalled_after = chrono::Duration::from_std(topology.stalled_after()).unwrap_or(chrono::Duration::MAX);
    let mut report = Report { ran: true, ..Report::default() };
    let mut after = String::new();
    loop {
        let page = db.active_batches(&after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.batch_id.clone();
        report.active += page.len();
        for batch in page {
            // A message of any batch on a plain subject may be this one's: wait for it.
            let waiting = of_batch(&batch.batch_id) > 0 || plain > 0;
            let pending = batch.status == BatchStatus::Ingesting || batch.pending > 0;
            if waiting || !pending {
                if batch.stalled_at.is_some() && mode == Mode::Act {
                    db.clear_stalled(&batch.batch_id).await?;
                }
                continue;
            }
            // Stalled. Re-driven once it was already found so at an earlier look, and has
            // been unchanged for stalled_after.
            let now = chrono::Utc::now();
            let due = batch.stalled_at.is_some() && now - batch.updated_at >= stalled_after;
            let redriven = due && mode == Mode::Act;
            let marked = batch.stalled_at.is_some();
            report.stalled.push(Stalled { batch_id: batch.batch_id.clone(), status: batch.status, pending: batch.pending, marked, redriven });
            if mode == Mode::DryRun {
                continue;
            }
            if batch.stalled_at.is_none() {
                tracing::warn!(
                    batch = %batch.batch_id, status = %batch.status, pending = batch.pending,
                    redrive_after = ?topology.stalled_after(),
                    "batch stalled: images pending and nothing of it in any stream (the broker lost its messages)"
                );
                db.mark_stalled(&batch.batch_id).await?;
            }
            if redriven {
                redrive(bus, db, topology, &batch, &mut report).await?;
            }
        }
    }
    metrics::gauge!(telemetry::STALLED_BATCHES).set(report.stalled.iter().filter(|s| !s.redriven).count() as f64);
    Ok(report)
}

/// Publishes a stalled batch's work again: its extract job while it is ingesting, else
/// a detect job for each pending image with an original and its recorded failure for
/// each without one.
async fn redrive(bus: &Bus, db: &Db, topology: &Topology, batch: &ActiveBatch, report: &mut Report) -> Result<(), ReconcileError> {
    let id = &batch.batch_id;
    if batch.status == BatchStatus::Ingesting {
        let Some(job) = db.redrive_job(id).await? else {
            tracing::error!(batch = %id, "batch stalled while ingesting, and its job was not recorded (submitted before the reconciler): submit it again");
            return Ok(());
        };
        let payload = bus.job_payload(&job)?;
        bus.publish_job_payload(topology, &job, payload).await?;
        metrics::counter!(telemetry::REDRIVEN, "what" => "job").increment(1);
        tracing::warn!(batch = %id, redrive = job.redrive, "re-drove the batch's extract job");
        report.redriven_jobs += 1;
        db.clear_stalled(id).await?;
        return Ok(());
    }
    let (mut after, mut images, mut failures) = (String::new(), 0u64, 0u64);
    loop {
        let page = db.pending_images(id, &after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.image_id.clone();
        let ids: Vec<&str> = page.iter().map(|p| p.image_id.as_str()).collect();
        let generations: std::collections::HashMap<String, u32> = db.count_redrives(id, &ids).await?.into_iter().collect();
        let subject = topology.batch_subject(StageName::Detect, batch.priority, id);
        let mut jobs = Vec::with_capacity(page.len());
        for pending in &page {
            let Some(&redrive) = generations.get(&pending.image_id) else { continue };
            let image = ImageRef { redrive, ..ImageRef::new(id.clone(), pending.image_id.clone(), batch.priority) };
            match &pending.original_key {
                Some(key) => {
                    let msg_id = keys::image_msg_id(MessageKind::DetectJob, &image);
                    let job = DetectJob { image, key: key.clone() };
                    jobs.push((subject.clone(), msg_id, messages::encode(&job)));
                }
                None => {
                    let why = pending.error.clone().unwrap_or_else(|| "the entry could not be read".into());
                    let failed = Outcome::failed(image, StageName::Extract, why, 1);
                    db.record_outcome(&failed).await?;
                    failures += 1;
                }
            }
        }
        images += jobs.len() as u64;
        bus.publish_all(jobs).await?;
    }
    metrics::counter!(telemetry::REDRIVEN, "what" => "image").increment(images);
    tracing::warn!(batch = %id, images, recorded_failures = failures, "re-drove the batch's pending images");
    report.redriven_images += images;
    report.recorded_failures += failures;
    db.clear_stalled(id).await?;
    Ok(())
}
