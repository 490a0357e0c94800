//! # crop: face boxes -> square JPEG crops in the object store -> outcome.

use facepipe_core::keys;
use facepipe_core::messages::{CropJob, ImageStatus, Outcome};
use facepipe_runtime::{Ctx, Delivery, Handled, Handler, StageError};
use facepipe_vision::crop;

/// The crop stage's handler.
pub struct Crop;

impl Handler for Crop {
    type Input = CropJob;

    async fn handle(&self, ctx: &Ctx, job: CropJob, delivery: Delivery) -> Result<Handled, StageError> {
        // Live settings: a crop size changed by `pipeline apply` applies from the next image.
        let current = ctx.current();
        let params = current.stages.crop.params.clone();
        let max_megapixels = current.stages.detect.params.max_megapixels;
        let chosen = crop::chosen_faces(&job.faces, &params);
        let mut crop_keys = Vec::with_capacity(chosen.len());
        if !chosen.is_empty() {
            let bytes = ctx.store.get(&job.key).await?;
            let (faces, which) = (job.faces.clone(), chosen.clone());
            let crops = ctx.blocking(move || {
                Ok(crop::crop_faces(&bytes, &faces, &which, &params, max_megapixels)?)
            })
            .await?;
            for (face, jpeg) in chosen.iter().zip(crops) {
                let key = keys::crop_key(&job.image.batch_id, &job.image.image_id, *face);
                ctx.store.put(&key, jpeg.into()).await?;
                crop_keys.push(key);
            }
        }
        let outcome = Outcome {
            status: if crop_keys.is_empty() { ImageStatus::NoFace } else { ImageStatus::Cropped },
            width: Some(job.width),
            height: Some(job.height),
            faces: job.faces,
            crop_keys,
            error: None,
            failed_stage: None,
            attempts: delivery.attempt,
            detector: job.detector,
            image: job.image,
        };
        ctx.publish_next(keys::MessageKind::Outcome, &outcome.image, &outcome).await?;
        Ok(Handled::Done)
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use facepipe_core::domain::{Detector, Priority, StageName};
    use facepipe_core::messages::{FaceBox, ImageRef};
    use facepipe_testkit::{shared_dir, StageHarness};

    fn job(faces: Vec<FaceBox>) -> CropJob {
        let image = ImageRef::new("b-1", "0000000", Priority::DEFAULT);
        CropJob { image, key: "batches/b-1/originals/0000000.png".into(), width: 512, height: 512, faces, detector: Some(Detector::Yunet) }
    }

    /// The handler on a real nats-server: the face's crop is stored under its deterministic
    /// key as a JPEG of the configured size, and the outcome goes on to persist.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_face_becomes_a_stored_crop_and_a_cropped_outcome() {
        let h = StageHarness::start(StageName::Crop, |_| {}).await;
        let astronaut = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
        h.ctx.store.put("batches/b-1/originals/0000000.png", astronaut.into()).await.unwrap();
        // The astronaut's face, as detect reports it (x, y, w, h in original pixels).
        let face = FaceBox::new(175.0, 70.0, 110.0, 140.0, 0.9);
        assert_eq!(Crop.handle(&h.ctx, job(vec![face]), StageHarness::first_delivery()).await.unwrap(), Handled::Done);
        let crop = h.ctx.store.get("batches/b-1/crops/0000000-0.jpg").await.unwrap();
        let size = imagesize::blob_size(&crop).unwrap();
        assert_eq!((size.width, size.height), (300, 300));
        let published = h.published_to(StageName::Persist).await;
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].msg_id.as_deref(), Some("persist:b-1:0000000"));
        let outcome: Outcome = facepipe_core::messages::decode(&published[0].payload).unwrap();
        assert_eq!((outcome.status, outcome.crop_keys.as_slice()), (ImageStatus::Cropped, &["batches/b-1/crops/0000000-0.jpg".to_string()][..]));
    }

    /// No face: nothing is read or stored, and the outcome says so.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_face_is_an_outcome_without_crops() {
        let h = StageHarness::start(StageName::Crop, |_| {}).await;
        assert_eq!(Crop.handle(&h.ctx, job(Vec::new()), StageHarness::first_delivery()).await.unwrap(), Handled::Done);
        let outcome: Outcome = facepipe_core::messages::decode(&h.published_to(StageName::Persist).await[0].payload).unwrap();
        assert_eq!((outcome.status, outcome.crop_keys.len()), (ImageStatus::NoFace, 0));
    }
}
