//! The extract stage binary: the [`extract::Extract`] handler on the stage runtime.

use extract::Extract;
use facepipe_core::topology::StageName;
use facepipe_runtime::app::Stage;

// One runtime thread: the heavy work runs on the stage's own CPU threads, and a
// second runtime thread only adds wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Extract, async |stage| {
        // Temporary files of crashed processes: the API's spooled uploads, and the downloads
        // of remote ZIPs that extract made before it read them in place.
        facepipe_runtime::scratch::sweep(&std::env::temp_dir());
        Ok(Extract { db: stage.database().await? })
    })
    .await?)
}
