//! The extract stage binary: the [`extract::Extract`] handler on the stage runtime.

use extract::Extract;
use facepipe_core::topology::StageName;
use facepipe_runtime::app::Stage;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Extract, async |stage| {
        // Downloads of remote ZIPs that a crashed extract left behind.
        facepipe_runtime::scratch::sweep(&std::env::temp_dir());
        Ok(Extract { db: stage.database().await? })
    })
    .await?)
}
