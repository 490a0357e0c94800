//! The persist stage: image outcome -> idempotent upsert in PostgreSQL, batch progress and completion.

use pipeline::app::Stage;
use pipeline::db::Db;
use pipeline::messages::{self, Outcome};
use pipeline::runtime::{Ctx, Delivery, Handled, Handler};
use pipeline::topology::StageName;
use pipeline::StageError;

struct Persist {
    db: Db,
}

impl Handler for Persist {
    type Input = Outcome;

    async fn ready(&self, ctx: &Ctx) -> bool {
        ctx.bus.is_connected() && self.db.ping().await.is_ok()
    }

    async fn handle(&self, ctx: &Ctx, outcome: Outcome, _: Delivery) -> Result<Handled, StageError> {
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Persist, async |stage| { Ok(Persist { db: stage.database().await? }) }).await?)
}
