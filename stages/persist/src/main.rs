//! The persist stage binary: the [`persist::Persist`] handler on the stage runtime, and
//! the reconciler (`facepipe_control::reconcile`) in whichever persist process holds its lock.

use facepipe_core::topology::StageName;
use facepipe_control::reconcile;
use facepipe_ledger::{Db, DbError};
use facepipe_runtime::app::Stage;
use persist::Persist;

// One runtime thread: the heavy work runs on the stage's own CPU threads, and a
// second runtime thread only adds wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Persist, async |stage| {
        // PostgreSQL may start after the stage: wait for it, migrated.
        let postgres = stage.ctx.topology.postgres.clone();
        let db = stage.wait_for("PostgreSQL", async || Db::open(&postgres).await, DbError::is_permanent).await?;
        // The reconciler, in whichever persist process holds its lock.
        let topology = &stage.ctx.topology;
        if topology.reconcile.enabled {
            let reconciler = reconcile::run(stage.ctx.bus.clone(), db.clone(), topology.clone(), stage.stopping());
            tokio::spawn(reconciler);
        }
        Ok(Persist::new(db))
    })
    .await?)
}
