//! Image work with OpenCV: header probing, DCT-scaled decoding, face
//! detection and cropping. All functions here are blocking CPU work; async
//! callers run them on `tokio::task::spawn_blocking`.
//!
//! Layout:
//! - [`decode`]: read dimensions from the header, pick a JPEG DCT reduction, decode upright.
//! - [`detect`]: YuNet (Haar fallback; optionally RetinaFace after it) per worker thread, boxes in original pixels.
//! - [`crop`]: crop-window geometry (pure) and crop encoding.
//! - [`onnx`]: ONNX Runtime, loaded once per process; sessions for one worker thread; NMS.
//! - [`yunet`]: YuNet on ONNX Runtime, with OpenCV 4.6's pre- and post-processing.
//! - [`retinaface`]: RetinaFace on ONNX Runtime, the optional second pass of [`detect`].
//! - [`region`]: decode only a crop's rectangle of a JPEG (libjpeg-turbo through `jpeg_region.c`), upright.

pub mod crop;
pub mod decode;
pub mod detect;
pub mod onnx;
pub mod region;
pub mod retinaface;
pub mod yunet;

/// Why an image could not be processed. Every variant is a property of the
/// input (or of the installation), so retrying does not help.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The bytes are not an image format we read.
    #[error("not a supported image: {0}")]
    Unsupported(String),
    /// The header claims more pixels than allowed.
    #[error("image of {width}x{height} exceeds the {limit_mp} megapixel limit")]
    TooLarge {
        /// Claimed width.
        width: u64,
        /// Claimed height.
        height: u64,
        /// Configured limit.
        limit_mp: f64,
    },
    /// OpenCV could not decode the data (truncated or corrupt).
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// An OpenCV call failed.
    #[error("opencv: {0}")]
    OpenCv(#[from] opencv::Error),
    /// The detector failed on an image.
    #[error("inference: {0}")]
    Inference(String),
    /// No usable detector (neither the model nor the Haar cascade loads).
    #[error("no face detector available: {0}")]
    NoDetector(String),
}

impl From<VisionError> for crate::error::StageError {
    fn from(e: VisionError) -> Self {
        crate::error::StageError::permanent(e)
    }
}
