//! # detect: original in the object store -> face boxes -> crop job.
//!
//! The detector is whatever the topology's `stages.detect.params` load. A live
//! change to them (`pipeline apply`) is tried before it is adopted: when the new
//! model does not load, the change is refused with an error in the log and the
//! detector that was running keeps running.

use std::sync::{Arc, Mutex};

use facepipe_core::domain::Detector;
use facepipe_core::keys;
use facepipe_core::messages::{CropJob, DetectJob};
use facepipe_core::telemetry;
use facepipe_core::topology::DetectParams;
use facepipe_runtime::{Ctx, Delivery, Handled, Handler, StageError};
use facepipe_vision::detect;

/// The detect stage's handler.
pub struct Detect {
    settings: Mutex<Settings>,
}

/// The parameters in use, and the last live change refused (so it is tried once, not per image).
struct Settings {
    accepted: Arc<DetectParams>,
    refused: Option<DetectParams>,
}

impl Detect {
    /// A handler running `params`, which the caller has loaded once (see [`detect::running`]).
    pub fn new(params: DetectParams) -> Self {
        Self { settings: Mutex::new(Settings { accepted: Arc::new(params), refused: None }) }
    }

    /// The parameters to detect with: the live ones once they have loaded, else the last that did.
    async fn params(&self, ctx: &Ctx) -> Arc<DetectParams> {
        let live = ctx.current().stages.detect.params.clone();
        let accepted = {
            let settings = self.settings.lock().expect("settings lock");
            if *settings.accepted == live || settings.refused.as_ref() == Some(&live) {
                return settings.accepted.clone();
            }
            settings.accepted.clone()
        };
        let candidate = live.clone();
        let tried = ctx.blocking(move || Ok(detect::running(&candidate)?)).await;
        let mut settings = self.settings.lock().expect("settings lock");
        match tried {
            Ok(running) => {
                tracing::info!(detector = %running.detector, engine = running.engine, model = %running.model, "detector changed live");
                settings.accepted = Arc::new(live);
                settings.refused = None;
                settings.accepted.clone()
            }
            Err(e) => {
                tracing::error!(error = %e.message(), "live detector change refused; the running detector keeps running");
                settings.refused = Some(live);
                accepted
            }
        }
    }
}

impl Handler for Detect {
    type Input = DetectJob;

    async fn handle(&self, ctx: &Ctx, job: DetectJob, _: Delivery) -> Result<Handled, StageError> {
        let bytes = ctx.store.get(&job.key).await?;
        // Each CPU thread loads its detector once, and again only when the accepted parameters change.
        let params = self.params(ctx).await;
        // Crops aligned by the eyes want the best landmarks of the faces they take.
        let crop = ctx.current().stages.crop.params.clone();
        let found = ctx.blocking(move || Ok(detect::detect_faces_for(&bytes, &params, Some(&crop))?)).await?;
        tracing::debug!(faces = found.faces.len(), "detected");
        metrics::counter!(telemetry::FACES_FOUND, "stage" => "detect").increment(found.faces.len() as u64);
        if found.detector == Detector::Retinaface {
            metrics::counter!(telemetry::SECOND_PASS_IMAGES, "stage" => "detect").increment(1);
        }
        let crop = CropJob {
            key: job.key,
            width: found.width,
            height: found.height,
            faces: found.faces,
            detector: Some(found.detector),
            image: job.image,
        };
        let msg_id = keys::msg_id(keys::MessageKind::CropJob, &crop.image.batch_id, &crop.image.image_id);
        ctx.publish_next(&msg_id, &crop.image, &crop).await?;
        Ok(Handled::Done)
    }
}
