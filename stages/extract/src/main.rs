//! The extract stage binary: the [`extract::Extract`] handler on the stage runtime.

use extract::Extract;
use facepipe_core::topology::StageName;
use facepipe_ledger::{Db, DbError};
use facepipe_runtime::app::Stage;

// One runtime thread: the heavy work runs on the stage's own CPU threads, and a
// second runtime thread only adds wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Extract, async |stage| {
        // Temporary files of crashed processes: the API's spooled uploads, and the downloads
        // of remote ZIPs that extract made before it read them in place.
        facepipe_runtime::scratch::sweep(&std::env::temp_dir());
        // PostgreSQL may start after the stage: wait for it, migrated.
        let postgres = stage.ctx.topology.postgres.clone();
        let db = stage.wait_for("PostgreSQL", async || Db::open(&postgres).await, DbError::is_permanent).await?;
        Ok(Extract { db })
    })
    .await?)
}
