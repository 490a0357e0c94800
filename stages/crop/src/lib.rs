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
        let msg_id = keys::msg_id(keys::MessageKind::Outcome, &outcome.image.batch_id, &outcome.image.image_id);
        ctx.publish_next(&msg_id, &outcome.image, &outcome).await?;
        Ok(Handled::Done)
    }
}

