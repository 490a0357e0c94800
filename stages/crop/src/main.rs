//! The crop stage binary: the [`crop::Crop`] handler on the stage runtime.

use crop::Crop;
use facepipe_core::topology::StageName;
use facepipe_runtime::app::Stage;
use facepipe_vision::detect;

// One runtime thread: the heavy work runs on the stage's own CPU threads, and a
// second runtime thread only adds wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    detect::set_opencv_threads(1);
    Ok(Stage::main(StageName::Crop, async |_| Ok(Crop)).await?)
}
