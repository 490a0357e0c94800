//! `[stages.crop.params]`: which faces are cropped, and how.

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};

/// Which faces the crop stage crops.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CropPolicy {
    /// The largest face only.
    #[default]
    Largest,
    /// One crop per face.
    All,
}

/// How the crop stage turns a crop.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CropAlign {
    /// Upright, as the photo is (the crop window follows the image's axes).
    #[default]
    None,
    /// Turned so that the eyes are level (by the face's landmarks; a face
    /// without landmarks, from the Haar cascade, is cropped upright).
    Eyes,
}

/// Parameters of the crop stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CropParams {
    /// Which faces to crop.
    pub policy: CropPolicy,
    /// Faces whose smaller side is below this (original pixels) are not cropped.
    pub min_face_size: u32,
    /// Padding added on each side, as a share of the face's larger side.
    pub padding: f64,
    /// Side of the square output, in pixels.
    pub output_size: u32,
    /// JPEG quality of the crop (1-100).
    pub jpeg_quality: i32,
    /// Whether crops are turned to level the eyes.
    pub align: CropAlign,
}

impl Default for CropParams {
    fn default() -> Self {
        Self { policy: CropPolicy::default(), min_face_size: 0, padding: 0.2, output_size: 300, jpeg_quality: 90, align: CropAlign::default() }
    }
}

impl CropParams {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure((0.0..=2.0).contains(&self.padding), "stages.crop.params.padding", "must be in [0, 2]")?;
        ensure((16..=4096).contains(&self.output_size), "stages.crop.params.output_size", "must be in 16..=4096")?;
        ensure((1..=100).contains(&self.jpeg_quality), "stages.crop.params.jpeg_quality", "must be in 1..=100")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn out_of_range_values_are_named() {
        let mut t = crate::topology::tests::repo();
        t.stages.crop.params.jpeg_quality = 0;
        assert!(t.validate().unwrap_err().to_string().contains("stages.crop.params.jpeg_quality"));
    }
}
