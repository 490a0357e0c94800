//! The detect stage: original in the object store -> face boxes -> crop job.

use pipeline::app::{Stage, StartError};
use pipeline::keys;
use pipeline::messages::{CropJob, DetectJob};
use pipeline::runtime::{self, Ctx, Delivery, Handled, Handler};
use pipeline::telemetry;
use pipeline::topology::StageName;
use pipeline::vision::detect;
use pipeline::StageError;

struct Detect;

impl Handler for Detect {
    type Input = DetectJob;

    async fn handle(&self, ctx: &Ctx, job: DetectJob, _: Delivery) -> Result<Handled, StageError> {
        let bytes = ctx.store.get(&job.key).await?;
        // Live settings: each CPU thread reloads its detector when they change.
        let params = ctx.current().stages.detect.params.clone();
        let found = runtime::blocking(move || Ok(detect::detect_faces(&bytes, &params)?)).await?;
        tracing::debug!(faces = found.faces.len(), "detected");
        metrics::counter!("facepipe_faces_found_total", "stage" => "detect").increment(found.faces.len() as u64);
        if found.detector == "retinaface" {
            metrics::counter!(telemetry::SECOND_PASS_IMAGES, "stage" => "detect").increment(1);
        }
        let crop = CropJob {
            key: job.key,
            width: found.width,
            height: found.height,
            faces: found.faces,
            detector: Some(found.detector.to_string()),
            image: job.image,
        };
        let msg_id = keys::msg_id("crop", &crop.image.batch_id, &crop.image.image_id);
        ctx.publish_next(&msg_id, &crop.image, &crop).await?;
        Ok(Handled::Done)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(Stage::main(StageName::Detect, async |stage| {
        let params = stage.ctx.topology.stages.detect.params.clone();
        // One image per worker thread: OpenCV's own threads would only oversubscribe the cores.
        detect::set_opencv_threads(1);
        let check = params.clone();
        let running = runtime::blocking(move || Ok(detect::running(&check)?))
            .await
            .map_err(|e| StartError::Stage(e.to_string()))?;
        tracing::info!(
            detector = running.detector,
            engine = running.engine,
            model = %running.model,
            score_threshold = running.score_threshold,
            second_pass = running.second_pass.as_deref().unwrap_or("off"),
            width = params.width,
            "detector ready"
        );
        Ok(Detect)
    })
    .await?)
}
