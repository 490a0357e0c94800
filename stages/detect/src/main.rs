//! The detect stage binary: the [`detect::Detect`] handler on the stage runtime.
//!
//! A detector that does not load is not served around: the process stays up
//! without pulling, and its log and `/readyz` say why.

use detect::Detect;
use facepipe_core::topology::StageName;
use facepipe_runtime::app::{Stage, StartError};
use facepipe_vision::detect as detector;

// One runtime thread: the heavy work runs on the stage's own CPU threads, and a
// second runtime thread only adds wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Detect, async |stage| {
        let params = stage.ctx.topology.stages.detect.params.clone();
        // One image per worker thread: OpenCV's own threads would only oversubscribe the cores.
        detector::set_opencv_threads(1);
        let check = params.clone();
        let running = stage
            .ctx
            .blocking(move || Ok(detector::running(&check)?))
            .await
            .map_err(|e| StartError::Refused(e.message()))?;
        tracing::info!(
            detector = %running.detector,
            engine = running.engine,
            model = %running.model,
            score_threshold = running.score_threshold,
            second_pass = running.second_pass.as_deref().unwrap_or("off"),
            width = params.width,
            "detector ready"
        );
        if let Some(why) = running.second_pass_off {
            stage.ctx.health.degrade(format!("the second pass: {why}"));
        }
        Ok(Detect::new(params))
    })
    .await?)
}
