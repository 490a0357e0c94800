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
//! - [`tiles`]: with `min_face`, the scale and overlapping tiles large photos are detected in, and the merge (pure).
//! - [`region`]: decode only a crop's rectangle of a JPEG (libjpeg-turbo through the `jpeg-region` crate), upright.

pub mod crop;
pub mod decode;
pub mod detect;
pub mod onnx;
pub mod region;
pub mod retinaface;
pub mod tiles;
pub mod yunet;

/// What a [`VisionError`] keeps of the library error behind it (its sources included).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an image could not be processed. The input's faults (unsupported, too
/// large, undecodable) are permanent; a failure of OpenCV or ONNX Runtime
/// itself, or a detector that cannot load, may pass, so it is retried. Each keeps
/// the library's error as its source.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The header is not an image format we read.
    #[error("not a supported image")]
    Unsupported(#[source] imagesize::ImageError),
    /// The header claims no pixels at all.
    #[error("not a supported image: zero-sized image")]
    Empty,
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
    /// OpenCV's decoder gave no pixels (truncated or corrupt data).
    #[error("cannot decode image: decoder returned no pixels (truncated or corrupt data)")]
    NoPixels,
    /// libjpeg could not decode the region asked for.
    #[error("cannot decode image")]
    Jpeg(#[source] jpeg_region::RegionError),
    /// An OpenCV call failed.
    #[error("opencv")]
    OpenCv(#[from] opencv::Error),
    /// ONNX Runtime failed to run a network on an image.
    #[error("{network} inference")]
    Inference {
        /// `YuNet` or `RetinaFace`.
        network: &'static str,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },
    /// A network's output is not the shape its decoder reads.
    #[error("{network} inference: {detail}")]
    Output {
        /// `YuNet` or `RetinaFace`.
        network: &'static str,
        /// What was found.
        detail: String,
    },
    /// No usable detector (neither the model nor the Haar cascade loads).
    #[error("no face detector available: {what}")]
    NoDetector {
        /// What does not load, and what to do about it.
        what: String,
        /// The loader's own error, when there is one.
        #[source]
        source: Option<Cause>,
    },
}

impl VisionError {
    /// A detector that does not load, for `what`, caused by `source`.
    pub fn no_detector(what: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::NoDetector { what: what.into(), source: Some(source.into()) }
    }

    /// A detector that does not load, for `what` alone.
    pub fn no_detector_because(what: impl Into<String>) -> Self {
        Self::NoDetector { what: what.into(), source: None }
    }

    /// ONNX Runtime's failure running `network`.
    pub fn inference(network: &'static str) -> impl Fn(ort::Error) -> Self {
        move |source| Self::Inference { network, source }
    }
}

impl facepipe_core::error::Classify for VisionError {
    fn kind(&self) -> facepipe_core::error::ErrorKind {
        use facepipe_core::error::ErrorKind;
        match self {
            VisionError::Unsupported(_) | VisionError::Empty | VisionError::TooLarge { .. } | VisionError::NoPixels | VisionError::Jpeg(_) => {
                ErrorKind::Permanent
            }
            VisionError::OpenCv(_) | VisionError::Inference { .. } | VisionError::Output { .. } | VisionError::NoDetector { .. } => {
                ErrorKind::Transient
            }
        }
    }
}
