//! The persist stage binary: the [`persist::Persist`] handler on the stage runtime.

use facepipe_core::topology::StageName;
use facepipe_runtime::app::Stage;
use persist::Persist;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Persist, async |stage| { Ok(Persist { db: stage.database().await? }) }).await?)
}
