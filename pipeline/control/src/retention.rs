//! The retention sweeper (`pipeline sweep`, and `pipeline serve` every
//! `retention.sweep_every`): deletes what `[retention]` says has expired.
//!
//! Safe while batches are in flight, because it only touches batches that are
//! `completed`, and only once the retry horizon of the stage that reads each
//! kind of object has passed since completion: past it, no message of the
//! batch can come back (an ack lost after the outcome was recorded comes back
//! within that horizon). Originals of failed images are never deleted, so a
//! replayed dead letter finds its input; a replay reopens the batch, and the
//! batch is swept again once it completes again.

use std::time::Duration;

use facepipe_core::keys;
use facepipe_core::topology::{StageName, Topology};
use facepipe_ledger::{Db, DbError, ObjectKind};
use facepipe_runtime::store::{Store, StoreError};

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one sweep deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// False when another sweeper held the lock, so this one did nothing.
    pub ran: bool,
    /// Batches whose uploaded ZIP was deleted.
    pub uploads: usize,
    /// Originals deleted.
    pub originals: usize,
    /// Crops deleted.
    pub crops: usize,
    /// Staging files of interrupted writes deleted.
    pub staging_files: usize,
}

/// Batches handled per query, so a backlog of many batches is swept in rounds.
const BATCHES_PER_ROUND: i64 = 100;
/// Originals looked up and deleted per round within one batch.
const ORIGINALS_PER_ROUND: i64 = 1000;

/// How long after completion a kind may be deleted: its retention period, but
/// never before the retry horizon of the stage that reads it.
fn delay(topology: &Topology, kind: ObjectKind) -> Option<Duration> {
    let r = &topology.retention;
    let (keep, readers): (_, &[StageName]) = match kind {
        ObjectKind::Upload => (r.uploads, &[StageName::Extract]),
        ObjectKind::Originals => (r.originals, &[StageName::Detect, StageName::Crop]),
        // Crops are read by no stage, only by people and the API.
        ObjectKind::Crops => (r.crops, &[]),
    };
    let horizon = readers.iter().map(|s| topology.retry_horizon_of(*s)).max().unwrap_or_default();
    keep.map(|k| k.max(horizon))
}

/// Runs one sweep, unless another sweeper is running (then `ran` is false).
pub async fn sweep(db: &Db, store: &Store, topology: &Topology) -> Result<SweepReport, SweepError> {
    let Some(_lock) = db.try_lock(facepipe_ledger::SWEEP_LOCK).await? else {
        tracing::info!("another sweeper is running; skipping this sweep");
        return Ok(SweepReport::default());
    };
    let mut report = SweepReport { ran: true, ..SweepReport::default() };
    for kind in ObjectKind::ALL {
        let Some(delay) = delay(topology, kind) else { continue };
        let started = chrono::Utc::now();
        // A period too long to subtract from now keeps everything, as no period does.
        let Some(completed_before) = chrono::Duration::from_std(delay).ok().and_then(|d| started.checked_sub_signed(d)) else {
            continue;
        };
        loop {
            let batches = db.batches_to_sweep(kind, completed_before, BATCHES_PER_ROUND).await?;
            for batch in &batches {
                let n = sweep_batch(db, store, batch, kind).await?;
                match kind {
                    ObjectKind::Upload => report.uploads += n,
                    ObjectKind::Originals => report.originals += n,
                    ObjectKind::Crops => report.crops += n,
                }
                db.mark_swept(batch, kind, started).await?;
                tracing::info!(batch_id = %batch, kind = kind.as_str(), deleted = n, "swept");
            }
            if (batches.len() as i64) < BATCHES_PER_ROUND {
                break;
            }
        }
    }
    let age = topology.retention.staging_age;
    let store_for_walk = store.clone();
    report.staging_files = tokio::task::spawn_blocking(move || store_for_walk.sweep_staging(age))
        .await
        .expect("staging sweep panicked")?;
    Ok(report)
}

/// Deletes one batch's objects of one kind; returns how many.
async fn sweep_batch(db: &Db, store: &Store, batch: &str, kind: ObjectKind) -> Result<usize, SweepError> {
    match kind {
        ObjectKind::Upload => {
            let key = keys::upload_key(batch);
            let existed = store.exists(&key).await?;
            store.delete_many(&[key]).await?;
            Ok(usize::from(existed))
        }
        ObjectKind::Crops => Ok(store.delete_prefix(&keys::crops_prefix(batch)).await?),
        ObjectKind::Originals => {
            let (mut after, mut n) = (String::new(), 0);
            loop {
                let page = db.final_originals(batch, &after, ORIGINALS_PER_ROUND).await?;
                let Some((last, _)) = page.last() else { return Ok(n) };
                after = last.clone();
                let keys: Vec<String> = page.into_iter().map(|(_, key)| key).collect();
                n += store.delete_many(&keys).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.toml")).unwrap();
        Topology::parse(&text).unwrap()
    }

    #[test]
    fn nothing_is_deleted_before_its_readers_retry_horizon() {
        let mut t = topology();
        t.retention.originals = Some(Duration::ZERO);
        t.retention.crops = Some(Duration::ZERO);
        t.retention.uploads = None;
        let horizon = t.retry_horizon_of(StageName::Detect).max(t.retry_horizon_of(StageName::Crop));
        assert!(horizon > Duration::from_secs(60), "{horizon:?}");
        assert_eq!(delay(&t, ObjectKind::Originals), Some(horizon));
        assert_eq!(delay(&t, ObjectKind::Crops), Some(Duration::ZERO));
        assert_eq!(delay(&t, ObjectKind::Upload), None);
        t.retention.originals = Some(Duration::from_secs(7 * 86400));
        assert_eq!(delay(&t, ObjectKind::Originals), Some(Duration::from_secs(7 * 86400)));
    }
}
