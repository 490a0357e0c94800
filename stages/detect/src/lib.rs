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
        ctx.publish_next(keys::MessageKind::CropJob, &crop.image, &crop).await?;
        Ok(Handled::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use facepipe_core::domain::{Priority, StageName};
    use facepipe_core::messages::ImageRef;
    use facepipe_testkit::{shared_dir, use_shared_models, StageHarness};

    fn job(image_id: &str, priority: i64) -> DetectJob {
        let image = ImageRef::new("b-1", image_id, Priority::new(priority).unwrap());
        DetectJob { key: format!("batches/b-1/originals/{image_id}.png"), image }
    }

    /// The handler on a real nats-server: a portrait's one face goes on to crop, on its
    /// priority's band, under the message id that makes a redelivery a duplicate.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_photo_becomes_a_crop_job_with_its_face_on_its_band() {
        let h = StageHarness::start(StageName::Detect, |t| use_shared_models(&mut t.stages.detect.params)).await;
        let params = h.ctx.topology.stages.detect.params.clone();
        let astronaut = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
        for (id, priority) in [("0000000", 5), ("0000001", 9)] {
            h.ctx.store.put(&job(id, priority).key, astronaut.clone().into()).await.unwrap();
        }
        let detect = Detect::new(params);
        for (id, priority) in [("0000000", 5), ("0000001", 9)] {
            let handled = detect.handle(&h.ctx, job(id, priority), StageHarness::first_delivery()).await.unwrap();
            assert_eq!(handled, Handled::Done);
        }
        let published = h.published_to(StageName::Crop).await;
        let subjects: Vec<&str> = published.iter().map(|p| p.subject.as_str()).collect();
        assert_eq!(subjects, ["faces.crop.normal.batch.b-1", "faces.crop.high.batch.b-1"], "each on its batch's subject of its priority's band");
        assert_eq!(published[0].msg_id.as_deref(), Some("crop:b-1:0000000"));
        let crop: CropJob = facepipe_core::messages::decode(&published[0].payload).unwrap();
        assert_eq!((crop.width, crop.height, crop.faces.len()), (512, 512, 1), "{crop:?}");
        assert_eq!(crop.detector, Some(Detector::Yunet), "a portrait YuNet is sure of");
        assert!(crop.faces[0].landmarks.is_some());
    }

    /// An original that is no image fails for good (no retry can help), and nothing goes on.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_undecodable_original_is_a_permanent_failure() {
        let h = StageHarness::start(StageName::Detect, |t| use_shared_models(&mut t.stages.detect.params)).await;
        let detect = Detect::new(h.ctx.topology.stages.detect.params.clone());
        h.ctx.store.put(&job("0000000", 5).key, b"not a picture".to_vec().into()).await.unwrap();
        let e = detect.handle(&h.ctx, job("0000000", 5), StageHarness::first_delivery()).await.unwrap_err();
        assert!(e.is_permanent() && e.message().contains("not a supported image"), "{}", e.message());
        let missing = detect.handle(&h.ctx, job("0000009", 5), StageHarness::first_delivery()).await.unwrap_err();
        assert!(missing.is_permanent(), "a missing original: {}", missing.message());
        assert!(h.published_to(StageName::Crop).await.is_empty());
    }
}
