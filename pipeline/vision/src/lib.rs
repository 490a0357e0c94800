//! # facepipe-vision: the image work of facepipe
//!
//! Header probing, DCT-scaled decoding, face detection and cropping, with
//! OpenCV and ONNX Runtime. All functions here are blocking CPU work; stages
//! run them on their CPU threads (`Ctx::blocking`). Only the detect and crop
//! stages and the CLI (eval, bench) link this crate, so extract and persist
//! carry neither OpenCV nor ONNX Runtime.
//!
//! ## Layout
//! - [`decode`]: read dimensions from the header, pick a JPEG DCT reduction, decode upright.
//! - [`detect`]: YuNet (Haar fallback; optionally RetinaFace after it) per worker thread, boxes and
//!   landmarks in original pixels; landmarks measured again for crops aligned by the eyes.
//! - [`crop`]: crop-window geometry (pure), upright or turned by the eye line, and crop encoding.
//! - [`onnx`]: ONNX Runtime, loaded once per process; sessions for one worker thread; NMS.
//! - [`yunet`]: YuNet on ONNX Runtime, with OpenCV 4.6's pre- and post-processing.
//! - [`retinaface`]: RetinaFace on ONNX Runtime, the optional second pass of [`detect`].
//! - [`region`]: decode only a crop's rectangle of a JPEG (libjpeg-turbo through the `jpeg-region` crate), upright.

pub mod crop;
pub mod decode;
pub mod detect;
pub mod onnx;
pub mod region;
pub mod retinaface;
pub mod yunet;

/// Why an image could not be processed. The input's faults (unsupported, too
/// large, undecodable) are permanent; a failure of OpenCV or ONNX Runtime
/// itself, or a detector that cannot load, may pass, so it is retried.
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

impl facepipe_core::retry::Classify for VisionError {
    fn kind(&self) -> facepipe_core::retry::ErrorKind {
        use facepipe_core::retry::ErrorKind;
        match self {
            VisionError::Unsupported(_) | VisionError::TooLarge { .. } | VisionError::Decode(_) => ErrorKind::Permanent,
            VisionError::OpenCv(_) | VisionError::Inference(_) | VisionError::NoDetector(_) => ErrorKind::Transient,
        }
    }
}
