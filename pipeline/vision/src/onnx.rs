//! What the ONNX Runtime detectors share: the runtime, loaded once per process
//! from a shared library; sessions that run on their worker's thread alone, for
//! any input size; and the final non-maximum suppression.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use opencv::core::Mat;
use opencv::prelude::*;
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use super::VisionError;
use facepipe_core::messages::FaceBox;

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

/// Loads `model` into an ONNX Runtime session running on this thread alone, with
/// its input and outputs' fixed sizes made free.
pub fn session(model: &Path, library: Option<&Path>) -> Result<Session, VisionError> {
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
    Ok(session)
}

/// Calls `f` with the 8-bit BGR bytes of `image`, row after row without gaps (copying the
/// image only when its rows have gaps, as a region of a larger one does).
pub fn with_bgr_bytes<T>(image: &Mat, f: impl FnOnce(&[u8]) -> T) -> Result<T, VisionError> {
    if image.is_continuous() {
        return Ok(f(image.data_bytes()?));
    }
    let copy = image.try_clone()?;
    Ok(f(copy.data_bytes()?))
}

/// Greedy NMS, highest score first, as `cv::dnn::NMSBoxes` on the boxes' integer rectangles.
pub fn non_maximum_suppression(mut faces: Vec<FaceBox>, threshold: f32) -> Vec<FaceBox> {
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
