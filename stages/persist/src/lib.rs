//! The persist stage: image outcome -> idempotent upsert in PostgreSQL, batch progress
//! and completion. Outcomes are committed in groups ([`group`]).

pub mod group;

use facepipe_core::domain::StageName;
use facepipe_core::messages::{self, ImageRef, Outcome};
use facepipe_ledger::{Db, DbError};
use facepipe_runtime::{Ctx, Delivery, Failed, Handled, Handler, StageError};

/// The persist stage's handler.
pub struct Persist {
    /// Where outcomes are recorded.
    pub db: Db,
    /// Records them, a group per statement.
    pub committer: group::Committer,
}

impl Persist {
    /// The handler on `db`, with its committer running.
    pub fn new(db: Db) -> Self {
        Self { committer: group::Committer::start(db.clone()), db }
    }
}

impl Handler for Persist {
    type Input = Outcome;

    async fn ready(&self, ctx: &Ctx) -> Result<(), String> {
        ctx.check_streams().await?;
        self.db.ping().await.map_err(|e| format!("PostgreSQL does not answer: {e}"))
    }

    async fn handle(&self, ctx: &Ctx, outcome: Outcome, _: Delivery) -> Result<Handled, StageError> {
        if !outcome.status.is_final() {
            return Err(StageError::permanent(format!("an outcome's status must be final, not `{}`", outcome.status)));
        }
        let batch_id = outcome.image.batch_id.clone();
        let recorded = self.committer.record(outcome).await?;
        if !recorded.first {
            tracing::debug!("outcome already recorded; redelivery ignored");
            return Ok(Handled::Skipped);
        }
        if recorded.completed_batch {
            tracing::info!(batch = %batch_id, "batch completed");
        }
        if let Some(progress) = &recorded.progress {
            // Best effort, for watchers: the database holds the truth.
            let subject = format!("{}.{}", ctx.topology.nats.progress_subject, progress.batch_id);
            if let Err(e) = ctx.bus.client.publish(subject, messages::encode(progress)).await {
                tracing::debug!(error = %e, "progress event not sent");
            }
        }
        Ok(Handled::Done)
    }

    /// An outcome persist cannot record (not a final status, say) is recorded as the
    /// image's failure, here: there is no stage after persist to send it to.
    async fn on_dead_letter(&self, _: &Ctx, failed: &Failed<'_>) -> Result<(), StageError> {
        let Ok(image) = messages::decode::<ImageRef>(failed.payload) else { return Ok(()) };
        let outcome = Outcome::failed(image, StageName::Persist, failed.error.message(), failed.attempts);
        match self.db.record_outcome(&outcome).await {
            // An image extract never registered has nothing to record.
            Ok(_) | Err(DbError::UnknownImage { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use facepipe_core::domain::{ImageStatus, Priority};
    use facepipe_ledger::NewImage;
    use facepipe_runtime::StageError;
    use facepipe_testkit::{StageHarness, TestDb};

    fn outcome(status: ImageStatus) -> Outcome {
        let image = ImageRef::new("b-1", "0000000", Priority::DEFAULT);
        Outcome { status, ..Outcome::failed(image, StageName::Crop, String::new(), 1) }
    }

    fn job(project: &str, zip: &str) -> facepipe_core::messages::ExtractJob {
        facepipe_core::messages::ExtractJob::for_zip(None, project.into(), Priority::DEFAULT, zip.into())
    }

    async fn ledger() -> (TestDb, Db) {
        let test_db = TestDb::create().await;
        let db = test_db.pool().await;
        db.insert_batch("b-1", &job("p", "test"), "test").await.unwrap();
        let image = NewImage { image_id: "0000000".into(), entry_name: "a.jpg".into(), original_key: "k".into(), record_id: None, error: None };
        db.insert_images("b-1", &[image]).await.unwrap();
        db.finish_ingest("b-1", 1, &[]).await.unwrap();
        (test_db, db)
    }

    /// The handler on a real nats-server and PostgreSQL: the first outcome is recorded
    /// and completes the batch; a redelivery changes nothing and says so.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_first_outcome_is_recorded_and_a_redelivery_is_skipped() {
        let h = StageHarness::start(StageName::Persist, |_| {}).await;
        let (_test_db, db) = ledger().await;
        let persist = Persist::new(db.clone());
        let delivery = StageHarness::first_delivery;
        assert_eq!(persist.handle(&h.ctx, outcome(ImageStatus::NoFace), delivery()).await.unwrap(), Handled::Done);
        assert_eq!(persist.handle(&h.ctx, outcome(ImageStatus::Cropped), delivery()).await.unwrap(), Handled::Skipped);
        let batch = db.batch_status("b-1").await.unwrap().unwrap();
        assert_eq!((batch.status, batch.processed), (facepipe_core::domain::BatchStatus::Completed, 1));
        assert_eq!(db.results("b-1").await.unwrap()[0].status, ImageStatus::NoFace, "the first outcome wins");
    }

    /// An outcome that is not final is refused for good, and the dead letter's failure is
    /// recorded by persist itself: there is no stage after it to send it to.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_outcome_it_cannot_record_is_recorded_as_the_images_failure() {
        let h = StageHarness::start(StageName::Persist, |_| {}).await;
        let (_test_db, db) = ledger().await;
        let persist = Persist::new(db.clone());
        let pending = outcome(ImageStatus::Pending);
        let error: StageError = persist.handle(&h.ctx, pending.clone(), StageHarness::first_delivery()).await.unwrap_err();
        assert!(error.is_permanent(), "{}", error.message());
        let payload = messages::encode(&pending);
        let failed = Failed { subject: "faces.persist", payload: &payload, stream_sequence: 7, published: String::new(), error: &error, attempts: 1 };
        persist.on_dead_letter(&h.ctx, &failed).await.unwrap();
        let result = &db.results("b-1").await.unwrap()[0];
        assert_eq!((result.status, result.failed_stage), (ImageStatus::Failed, Some(StageName::Persist)));
        assert!(result.error.as_deref().unwrap_or_default().contains("must be final"), "{result:?}");
    }
}
