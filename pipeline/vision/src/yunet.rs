//! YuNet on ONNX Runtime: the 2022mar file OpenCV 4.6 runs, and the 2023mar
//! file it cannot load (decoded as OpenCV >= 4.8 decodes it).
//!
//! The same model file `cv::FaceDetectorYN` runs, executed by ONNX Runtime,
//! which runs it far faster than OpenCV 4.6's DNN module (on this project's
//! 2-core machine 9.9 against 26.6 ms at 640x480, one thread each). The pre-
//! and post-processing are OpenCV 4.6's own (`objdetect/src/face_detect.cpp`):
//! raw BGR values as input, anchor priors on four feature maps, box decoding
//! with variances 0.1 and 0.2, score `sqrt(cls * iou)`, then NMS. A test
//! checks the boxes against `cv::FaceDetectorYN` on real photos.
//!
//! ONNX Runtime is loaded at run time from a shared library (PyPI's
//! `onnxruntime` wheel carries one; `scripts/setup` installs it), so the
//! binaries build and run without it: the detector then falls back to OpenCV.

use std::path::Path;

use opencv::core::Mat;
use opencv::prelude::*;
use ort::session::Session;
use ort::value::TensorRef;

use super::onnx::{self, non_maximum_suppression};
use super::VisionError;
use facepipe_core::messages::{FaceBox, Landmarks};

/// YuNet on ONNX Runtime: one session and its buffers, run by one thread at a time
/// (a process shares a few through [`onnx::Shared`]).
pub struct OrtYunet {
    session: Session,
    /// Which YuNet the file holds: the two releases decode their outputs differently.
    release: Release,
    /// Priors of the last input size (2022mar; they depend only on it).
    priors: Priors,
    /// The NCHW float input, reused between images.
    input: Vec<f32>,
}

/// The YuNet releases, told apart by their outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// `face_detection_yunet_2022mar.onnx`: anchor priors, outputs `loc`, `conf`, `iou`.
    Mar2022,
    /// `face_detection_yunet_2023mar.onnx`: anchor-free, per-stride `cls`, `obj`, `bbox`, `kps` (landmarks)
    /// (OpenCV needs >= 4.8 for it; ONNX Runtime runs it anywhere).
    Mar2023,
}

const STRIDES_2023: [usize; 3] = [8, 16, 32];

impl OrtYunet {
    /// Loads `model` (YuNet 2022mar or 2023mar) into an ONNX Runtime session running on this thread alone.
    pub fn load(model: &Path, library: Option<&Path>) -> Result<Self, VisionError> {
        let session = onnx::session(model, library)?;
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let has = |name: &str| names.contains(&name);
        let release = if ["loc", "conf", "iou"].iter().all(|n| has(n)) {
            Release::Mar2022
        } else if STRIDES_2023.iter().all(|s| ["cls", "obj", "bbox", "kps"].iter().all(|k| has(&format!("{k}_{s}")))) {
            Release::Mar2023
        } else {
            return Err(VisionError::no_detector_because(format!(
                "ONNX Runtime cannot load {}: outputs {names:?} are neither YuNet 2022mar's nor 2023mar's",
                model.display()
            )));
        };
        Ok(Self { session, release, priors: Priors::default(), input: Vec::new() })
    }

    /// Which YuNet release the model file holds.
    pub fn release(&self) -> Release {
        self.release
    }

    /// Faces in `image` (8-bit BGR), in its pixels.
    pub fn detect(&mut self, image: &Mat, score_threshold: f32, nms_threshold: f32) -> Result<Vec<FaceBox>, VisionError> {
        // The network halves the input five times: pad to a multiple of 32, and to at least 64
        // (black, bottom and right, so coordinates stay the image's).
        let (w, h) = (image.cols() as usize, image.rows() as usize);
        let (pw, ph) = ((w.div_ceil(32) * 32).max(64), (h.div_ceil(32) * 32).max(64));
        self.fill_input(image, pw, ph)?;
        if self.release == Release::Mar2022 && (self.priors.width, self.priors.height) != (pw, ph) {
            self.priors = Priors::new(pw, ph);
        }
        let input = TensorRef::from_array_view(([1usize, 3, ph, pw], self.input.as_slice()))
            .map_err(VisionError::inference("YuNet"))?;
        let outputs = self.session.run(ort::inputs!["input" => input]).map_err(VisionError::inference("YuNet"))?;
        let tensor = |name: &str| -> Result<&[f32], VisionError> {
            let value = outputs.get(name).ok_or_else(|| VisionError::Output { network: "YuNet", detail: format!("no output {name}") })?;
            let (_, data) = value.try_extract_tensor::<f32>().map_err(VisionError::inference("YuNet"))?;
            Ok(data)
        };
        if self.release == Release::Mar2023 {
            let mut candidates = Vec::new();
            for stride in STRIDES_2023 {
                let get = |kind: &str| tensor(&format!("{kind}_{stride}"));
                let (cols, rows) = (pw / stride, ph / stride);
                let (cls, obj, bbox, kps) = (get("cls")?, get("obj")?, get("bbox")?, get("kps")?);
                let cells = cols * rows;
                if cls.len() != cells || obj.len() != cells || bbox.len() != cells * 4 || kps.len() != cells * 10 {
                    let detail = format!("{} cells at stride {stride} for {pw}x{ph}", cls.len());
                    return Err(VisionError::Output { network: "YuNet", detail });
                }
                let at_stride = Stride2023 { stride, cols, cls, obj, bbox, kps };
                at_stride.decode(score_threshold, &mut candidates);
            }
            return Ok(non_maximum_suppression(candidates, nms_threshold));
        }
        let (loc, conf, iou) = (tensor("loc")?, tensor("conf")?, tensor("iou")?);
        let n = self.priors.boxes.len();
        if loc.len() != n * 14 || conf.len() != n * 2 || iou.len() != n {
            return Err(VisionError::Output { network: "YuNet", detail: format!("{} rows for {n} priors at {pw}x{ph}", iou.len()) });
        }
        let candidates = decode(&self.priors, loc, conf, iou, score_threshold);
        Ok(non_maximum_suppression(candidates, nms_threshold))
    }

    /// BGR bytes (HWC) into the reused NCHW float buffer, padded with zeros.
    fn fill_input(&mut self, image: &Mat, pw: usize, ph: usize) -> Result<(), VisionError> {
        let (w, h) = (image.cols() as usize, image.rows() as usize);
        let plane = pw * ph;
        self.input.clear();
        self.input.resize(plane * 3, 0.0);
        let (blue, rest) = self.input.split_at_mut(plane);
        let (green, red) = rest.split_at_mut(plane);
        onnx::with_bgr_bytes(image, |pixels| {
            for y in 0..h {
                let row = &pixels[y * w * 3..(y + 1) * w * 3];
                let at = y * pw;
                for (x, bgr) in row.chunks_exact(3).enumerate() {
                    blue[at + x] = bgr[0] as f32;
                    green[at + x] = bgr[1] as f32;
                    red[at + x] = bgr[2] as f32;
                }
            }
        })
    }
}

/// Anchor boxes (centre and size, as fractions of the padded input) in the order the network emits rows.
#[derive(Default)]
struct Priors {
    width: usize,
    height: usize,
    boxes: Vec<[f32; 4]>,
}

impl Priors {
    /// OpenCV 4.6's `generatePriors` for a `width` x `height` input.
    fn new(width: usize, height: usize) -> Self {
        const MIN_SIZES: [&[f32]; 4] = [&[10.0, 16.0, 24.0], &[32.0, 48.0], &[64.0, 96.0], &[128.0, 192.0, 256.0]];
        const STEPS: [f32; 4] = [8.0, 16.0, 32.0, 64.0];
        let (mut fw, mut fh) = (width.div_ceil(2) / 2, height.div_ceil(2) / 2);
        let mut boxes = Vec::new();
        for (min_sizes, step) in MIN_SIZES.iter().zip(STEPS) {
            (fw, fh) = (fw / 2, fh / 2);
            for row in 0..fh {
                for col in 0..fw {
                    for size in *min_sizes {
                        boxes.push([
                            (col as f32 + 0.5) * step / width as f32,
                            (row as f32 + 0.5) * step / height as f32,
                            size / width as f32,
                            size / height as f32,
                        ]);
                    }
                }
            }
        }
        Self { width, height, boxes }
    }
}

/// Boxes scoring at least `threshold`, in input pixels.
fn decode(priors: &Priors, loc: &[f32], conf: &[f32], iou: &[f32], threshold: f32) -> Vec<FaceBox> {
    const VARIANCE: [f32; 2] = [0.1, 0.2];
    let (w, h) = (priors.width as f32, priors.height as f32);
    let mut faces = Vec::new();
    for (i, [px, py, pw, ph]) in priors.boxes.iter().copied().enumerate() {
        let score = (conf[i * 2 + 1] * iou[i].clamp(0.0, 1.0)).sqrt();
        if score.is_nan() || score < threshold {
            continue;
        }
        let l = &loc[i * 14..i * 14 + 14];
        let cx = (px + l[0] * VARIANCE[0] * pw) * w;
        let cy = (py + l[1] * VARIANCE[0] * ph) * h;
        // OpenCV 4.6 scales the width with the first variance and the height with the second;
        // kept, so both engines give the same boxes.
        let bw = pw * (l[2] * VARIANCE[0]).exp() * w;
        let bh = ph * (l[3] * VARIANCE[1]).exp() * h;
        // Landmarks: offsets from the prior's centre, scaled by the first variance.
        let point = |k: usize| [(px + l[4 + 2 * k] * VARIANCE[0] * pw) * w, (py + l[5 + 2 * k] * VARIANCE[0] * ph) * h];
        let landmarks = Some(Landmarks(std::array::from_fn(point)));
        faces.push(FaceBox { x: cx - bw / 2.0, y: cy - bh / 2.0, w: bw, h: bh, score, landmarks });
    }
    faces
}

/// The outputs of YuNet 2023mar for one stride.
struct Stride2023<'a> {
    stride: usize,
    cols: usize,
    cls: &'a [f32],
    obj: &'a [f32],
    bbox: &'a [f32],
    kps: &'a [f32],
}

impl Stride2023<'_> {
    /// Boxes scoring at least `threshold`, in input pixels (OpenCV >= 4.8's
    /// `FaceDetectorYN::postProcess`).
    fn decode(&self, threshold: f32, faces: &mut Vec<FaceBox>) {
        let s = self.stride as f32;
        for (i, (c, o)) in self.cls.iter().zip(self.obj).enumerate() {
            let score = (c.clamp(0.0, 1.0) * o.clamp(0.0, 1.0)).sqrt();
            if score.is_nan() || score < threshold {
                continue;
            }
            let (col, row) = ((i % self.cols) as f32, (i / self.cols) as f32);
            let b = &self.bbox[i * 4..i * 4 + 4];
            let (cx, cy) = ((col + b[0]) * s, (row + b[1]) * s);
            let (w, h) = (b[2].exp() * s, b[3].exp() * s);
            let k = &self.kps[i * 10..i * 10 + 10];
            let landmarks = Some(Landmarks(std::array::from_fn(|j| [(col + k[2 * j]) * s, (row + k[2 * j + 1]) * s])));
            faces.push(FaceBox { x: cx - w / 2.0, y: cy - h / 2.0, w, h, score, landmarks });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priors_match_the_network_rows_at_640x480() {
        // 60x80x3 + 30x40x2 + 15x20x2 + 7x10x3, the row count ONNX Runtime reports.
        assert_eq!(Priors::new(640, 480).boxes.len(), 17_610);
    }
}
