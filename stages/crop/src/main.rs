//! The crop stage binary: the [`crop::Crop`] handler on the stage runtime.

use crop::Crop;
use facepipe_core::topology::StageName;
use facepipe_runtime::app::Stage;
use facepipe_vision::detect;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    detect::set_opencv_threads(1);
    Ok(Stage::main(StageName::Crop, async |_| Ok(Crop)).await?)
}
