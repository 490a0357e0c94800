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

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use opencv::core::Mat;
use opencv::prelude::*;
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use super::VisionError;
use crate::messages::FaceBox;

/// One ONNX Runtime environment per process (the library allows no more).
static RUNTIME: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// The ONNX Runtime library `configured`, else `$ORT_DYLIB_PATH`, else `libonnxruntime.so` on the loader's path.
fn library_path(configured: Option<&Path>) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

fn environment(library: Option<&Path>) -> Result<&'static Environment, VisionError> {
    let wanted = library_path(library);
    let (loaded, env) = RUNTIME
        .get_or_init(|| {
            let builder = ort::init_from(&wanted).map_err(|e| format!("{}: {e}", wanted.display()))?;
            let env = builder.with_name("facepipe").build().map_err(|e| e.to_string())?;
            Ok((wanted.clone(), env))
        })
        .as_ref()
        .map_err(|e| VisionError::NoDetector(format!("ONNX Runtime does not load: {e}")))?;
    if *loaded != wanted {
        tracing::warn!(loaded = %loaded.display(), wanted = %wanted.display(), "ONNX Runtime is loaded once per process; keeping the first library");
    }
    Ok(env)
}

/// YuNet on ONNX Runtime, for one worker thread.
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
    /// `face_detection_yunet_2023mar.onnx`: anchor-free, per-stride `cls`, `obj`, `bbox`, `kps`
    /// (OpenCV needs >= 4.8 for it; ONNX Runtime runs it anywhere).
    Mar2023,
}

const STRIDES_2023: [usize; 3] = [8, 16, 32];

impl OrtYunet {
    /// Loads `model` (YuNet 2022mar or 2023mar) into an ONNX Runtime session running on this thread alone.
    pub fn load(model: &Path, library: Option<&Path>) -> Result<Self, VisionError> {
        let env = environment(library)?;
        let bytes = std::fs::read(model).map_err(|e| VisionError::NoDetector(format!("{}: {e}", model.display())))?;
        let bytes = free_input_and_output_shapes(&bytes)
            .ok_or_else(|| VisionError::NoDetector(format!("{} is not an ONNX model this code understands", model.display())))?;
        let failed = |e: String| VisionError::NoDetector(format!("ONNX Runtime cannot load {}: {e}", model.display()));
        let builder = Session::builder(env).map_err(|e| failed(e.to_string()))?;
        // No memory pattern: it keeps a peak-sized block per session (one per worker
        // thread); measured at 12 MP, 182 -> 152 MB peak RSS for detect, same speed.
        // (Without the arena too, malloc churn made it 310 MB and slower.)
        let builder = builder.with_memory_pattern(false).map_err(|e| failed(e.to_string()))?;
        let builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| failed(e.to_string()))?;
        // One thread per session: the stage runs one image per worker thread.
        let builder = builder.with_intra_threads(1).map_err(|e| failed(e.to_string()))?;
        let mut builder = builder.with_inter_threads(1).map_err(|e| failed(e.to_string()))?;
        let session = builder.commit_from_memory(&bytes).map_err(|e| failed(e.to_string()))?;
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let has = |name: &str| names.contains(&name);
        let release = if ["loc", "conf", "iou"].iter().all(|n| has(n)) {
            Release::Mar2022
        } else if STRIDES_2023.iter().all(|s| ["cls", "obj", "bbox"].iter().all(|k| has(&format!("{k}_{s}")))) {
            Release::Mar2023
        } else {
            return Err(failed(format!("outputs {names:?} are neither YuNet 2022mar's nor 2023mar's")));
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
            .map_err(|e| VisionError::Inference(e.to_string()))?;
        let outputs = self.session.run(ort::inputs!["input" => input]).map_err(|e| VisionError::Inference(e.to_string()))?;
        let tensor = |name: &str| -> Result<&[f32], VisionError> {
            let value = outputs.get(name).ok_or_else(|| VisionError::Inference(format!("no output {name}")))?;
            let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| VisionError::Inference(e.to_string()))?;
            Ok(data)
        };
        if self.release == Release::Mar2023 {
            let mut candidates = Vec::new();
            for stride in STRIDES_2023 {
                let get = |kind: &str| tensor(&format!("{kind}_{stride}"));
                let (cols, rows) = (pw / stride, ph / stride);
                let (cls, obj, bbox) = (get("cls")?, get("obj")?, get("bbox")?);
                if cls.len() != cols * rows || obj.len() != cols * rows || bbox.len() != cols * rows * 4 {
                    return Err(VisionError::Inference(format!("YuNet gave {} cells at stride {stride} for {pw}x{ph}", cls.len())));
                }
                decode_2023(stride, cols, cls, obj, bbox, score_threshold, &mut candidates);
            }
            return Ok(non_maximum_suppression(candidates, nms_threshold));
        }
        let (loc, conf, iou) = (tensor("loc")?, tensor("conf")?, tensor("iou")?);
        let n = self.priors.boxes.len();
        if loc.len() != n * 14 || conf.len() != n * 2 || iou.len() != n {
            return Err(VisionError::Inference(format!(
                "YuNet gave {} rows for {n} priors at {pw}x{ph}",
                iou.len()
            )));
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
        let continuous;
        let image = if image.is_continuous() {
            image
        } else {
            continuous = image.try_clone()?;
            &continuous
        };
        let pixels = image.data_bytes()?;
        let (blue, rest) = self.input.split_at_mut(plane);
        let (green, red) = rest.split_at_mut(plane);
        for y in 0..h {
            let row = &pixels[y * w * 3..(y + 1) * w * 3];
            let at = y * pw;
            for (x, bgr) in row.chunks_exact(3).enumerate() {
                blue[at + x] = bgr[0] as f32;
                green[at + x] = bgr[1] as f32;
                red[at + x] = bgr[2] as f32;
            }
        }
        Ok(())
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
        let l = &loc[i * 14..i * 14 + 4];
        let cx = (px + l[0] * VARIANCE[0] * pw) * w;
        let cy = (py + l[1] * VARIANCE[0] * ph) * h;
        // OpenCV 4.6 scales the width with the first variance and the height with the second;
        // kept, so both engines give the same boxes.
        let bw = pw * (l[2] * VARIANCE[0]).exp() * w;
        let bh = ph * (l[3] * VARIANCE[1]).exp() * h;
        faces.push(FaceBox { x: cx - bw / 2.0, y: cy - bh / 2.0, w: bw, h: bh, score });
    }
    faces
}

/// Boxes of one stride of YuNet 2023mar scoring at least `threshold`, in input pixels
/// (OpenCV >= 4.8's `FaceDetectorYN::postProcess`).
fn decode_2023(stride: usize, cols: usize, cls: &[f32], obj: &[f32], bbox: &[f32], threshold: f32, faces: &mut Vec<FaceBox>) {
    let s = stride as f32;
    for (i, (c, o)) in cls.iter().zip(obj).enumerate() {
        let score = (c.clamp(0.0, 1.0) * o.clamp(0.0, 1.0)).sqrt();
        if score.is_nan() || score < threshold {
            continue;
        }
        let (col, row) = ((i % cols) as f32, (i / cols) as f32);
        let b = &bbox[i * 4..i * 4 + 4];
        let (cx, cy) = ((col + b[0]) * s, (row + b[1]) * s);
        let (w, h) = (b[2].exp() * s, b[3].exp() * s);
        faces.push(FaceBox { x: cx - w / 2.0, y: cy - h / 2.0, w, h, score });
    }
}

/// Greedy NMS, highest score first, as `cv::dnn::NMSBoxes` on the boxes' integer rectangles.
fn non_maximum_suppression(mut faces: Vec<FaceBox>, threshold: f32) -> Vec<FaceBox> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let rect = |f: &FaceBox| (f.x.trunc(), f.y.trunc(), f.w.trunc(), f.h.trunc());
    let iou = |a: &FaceBox, b: &FaceBox| {
        let ((ax, ay, aw, ah), (bx, by, bw, bh)) = (rect(a), rect(b));
        let iw = ((ax + aw).min(bx + bw) - ax.max(bx)).max(0.0);
        let ih = ((ay + ah).min(by + bh) - ay.max(by)).max(0.0);
        let inter = iw * ih;
        let union = aw * ah + bw * bh - inter;
        if union <= 0.0 { 0.0 } else { inter / union }
    };
    let mut kept: Vec<FaceBox> = Vec::new();
    for face in faces {
        if kept.iter().all(|k| iou(k, &face) <= threshold) {
            kept.push(face);
        }
    }
    kept
}

/// The model with its input and outputs' fixed sizes made free, so one session
/// serves every input size (the file pins 1x3x120x160).
///
/// Rewrites the protobuf in place of a dependency on ONNX's schema: only
/// `graph.input["input"]` and `graph.output[*]` shapes change; every other
/// byte is copied. `None` if the bytes are not such a model.
fn free_input_and_output_shapes(model: &[u8]) -> Option<Vec<u8>> {
    // Field numbers from onnx.proto: ModelProto.graph = 7; GraphProto.input = 11, .output = 12;
    // ValueInfoProto.name = 1, .type = 2; TypeProto.tensor_type = 1; Tensor.shape = 2;
    // TensorShapeProto.dim = 1; Dimension.dim_param = 2.
    let mut found = false;
    let out = protobuf::map_fields(model, &mut |field, body| match field {
        7 => protobuf::map_fields(body, &mut |field, body| match field {
            11 | 12 => {
                let name = protobuf::fields(body)?.find(|(f, _)| *f == 1).map(|(_, b)| b.to_vec());
                if field == 11 && name.as_deref() != Some(b"input".as_slice()) {
                    return Some(body.to_vec());
                }
                found = true;
                free_dims(body)
            }
            _ => Some(body.to_vec()),
        }),
        _ => Some(body.to_vec()),
    })?;
    found.then_some(out)
}

/// A ValueInfoProto with every dimension of its tensor shape made symbolic.
fn free_dims(value_info: &[u8]) -> Option<Vec<u8>> {
    let mut index = 0;
    protobuf::map_fields(value_info, &mut |field, body| match field {
        2 => protobuf::map_fields(body, &mut |field, body| match field {
            1 => protobuf::map_fields(body, &mut |field, body| match field {
                2 => protobuf::map_fields(body, &mut |field, body| match field {
                    1 => {
                        index += 1;
                        let mut dim = Vec::new();
                        protobuf::put_bytes(&mut dim, 2, format!("free{index}").as_bytes());
                        Some(dim)
                    }
                    _ => Some(body.to_vec()),
                }),
                _ => Some(body.to_vec()),
            }),
            _ => Some(body.to_vec()),
        }),
        _ => Some(body.to_vec()),
    })
}

/// Just enough of protobuf's wire format to rewrite nested length-delimited fields.
mod protobuf {
    fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *buf.get(*pos)?;
            *pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn put_varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    /// Appends a length-delimited field.
    pub fn put_bytes(out: &mut Vec<u8>, field: u64, body: &[u8]) {
        put_varint(out, field << 3 | 2);
        put_varint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    /// One field of a message: its number, wire type and raw bytes (tag included), and
    /// for length-delimited fields the body.
    struct Field<'a> {
        number: u64,
        raw: &'a [u8],
        body: Option<&'a [u8]>,
    }

    fn next_field<'a>(buf: &'a [u8], pos: &mut usize) -> Option<Field<'a>> {
        let start = *pos;
        let tag = varint(buf, pos)?;
        let body = match tag & 7 {
            0 => {
                varint(buf, pos)?;
                None
            }
            1 => {
                *pos = pos.checked_add(8).filter(|p| *p <= buf.len())?;
                None
            }
            2 => {
                let len = usize::try_from(varint(buf, pos)?).ok()?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len())?;
                let body = &buf[*pos..end];
                *pos = end;
                Some(body)
            }
            5 => {
                *pos = pos.checked_add(4).filter(|p| *p <= buf.len())?;
                None
            }
            _ => return None,
        };
        Some(Field { number: tag >> 3, raw: &buf[start..*pos], body })
    }

    /// The length-delimited fields of a message, as (number, body).
    pub fn fields(buf: &[u8]) -> Option<impl Iterator<Item = (u64, &[u8])>> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < buf.len() {
            let field = next_field(buf, &mut pos)?;
            if let Some(body) = field.body {
                out.push((field.number, body));
            }
        }
        Some(out.into_iter())
    }

    /// Gives the new body of a length-delimited field from its number and body; `None` aborts.
    pub type Rewrite<'a> = dyn FnMut(u64, &[u8]) -> Option<Vec<u8>> + 'a;

    /// The message with each length-delimited field's body replaced by `f(number, body)`.
    pub fn map_fields(buf: &[u8], f: &mut Rewrite<'_>) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        while pos < buf.len() {
            let field = next_field(buf, &mut pos)?;
            match field.body {
                Some(body) => put_bytes(&mut out, field.number, &f(field.number, body)?),
                None => out.extend_from_slice(field.raw),
            }
        }
        Some(out)
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

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let f = |x: f32, score| FaceBox { x, y: 0.0, w: 100.0, h: 100.0, score };
        let kept = non_maximum_suppression(vec![f(0.0, 0.8), f(5.0, 0.9), f(300.0, 0.85)], 0.3);
        assert_eq!(kept.iter().map(|k| k.x).collect::<Vec<_>>(), vec![5.0, 300.0]);
    }

    #[test]
    fn protobuf_rewrite_leaves_other_bytes_alone() {
        // A tiny "model": graph { input { name: "input" type { tensor_type { shape { dim { dim_value: 3 } } } } } }
        let mut dim = Vec::new();
        dim.extend_from_slice(&[0x08, 0x03]); // dim_value = 3
        let mut shape = Vec::new();
        protobuf::put_bytes(&mut shape, 1, &dim);
        let mut tensor = vec![0x08, 0x01]; // elem_type = FLOAT
        protobuf::put_bytes(&mut tensor, 2, &shape);
        let mut ty = Vec::new();
        protobuf::put_bytes(&mut ty, 1, &tensor);
        let mut info = Vec::new();
        protobuf::put_bytes(&mut info, 1, b"input");
        protobuf::put_bytes(&mut info, 2, &ty);
        let mut graph = Vec::new();
        protobuf::put_bytes(&mut graph, 11, &info);
        let mut model = vec![0x08, 0x07]; // ir_version = 7
        protobuf::put_bytes(&mut model, 7, &graph);

        let rewritten = free_input_and_output_shapes(&model).unwrap();
        assert!(rewritten.starts_with(&[0x08, 0x07]));
        assert!(rewritten.windows(5).any(|w| w == b"free1"));
        assert!(!rewritten.windows(2).any(|w| w == [0x08, 0x03]), "the fixed size is gone");
        assert!(free_input_and_output_shapes(b"\x08\x07").is_none(), "no graph input: not a model we know");
    }
}
