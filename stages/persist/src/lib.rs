//! The persist stage: image outcome -> idempotent upsert in PostgreSQL, batch progress and completion.

use facepipe_core::domain::StageName;
use facepipe_core::messages::{self, ImageRef, Outcome};
use facepipe_ledger::{Db, DbError};
use facepipe_runtime::{Ctx, Delivery, Failed, Handled, Handler, StageError};

/// The persist stage's handler.
pub struct Persist {
    /// Where outcomes are recorded.
    pub db: Db,
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
        let recorded = self.db.record_outcome(&outcome).await?;
        if !recorded.first {
            tracing::debug!("outcome already recorded; redelivery ignored");
            return Ok(Handled::Skipped);
        }
        if recorded.completed_batch {
            tracing::info!(batch = %outcome.image.batch_id, "batch completed");
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

