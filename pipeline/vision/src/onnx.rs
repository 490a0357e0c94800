//! What the ONNX Runtime detectors share: the runtime, loaded once per process
//! from a shared library; sessions for any input size, each run by one thread at
//! a time, and [`Shared`], the few a process's worker threads take turns on; and
//! the final non-maximum suppression.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use opencv::core::Mat;
use opencv::prelude::*;
use onnx_protobuf::{type_proto, Message, ModelProto};
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
        .map_err(|e| VisionError::no_detector_because(format!("ONNX Runtime does not load: {e}")))?;
    if *loaded != wanted {
        tracing::warn!(loaded = %loaded.display(), wanted = %wanted.display(), "ONNX Runtime is loaded once per process; keeping the first library");
    }
    Ok(env)
}

/// Loads `model` into an ONNX Runtime session run by one thread at a time, with
/// its input and outputs' fixed sizes made free.
pub fn session(model: &Path, library: Option<&Path>) -> Result<Session, VisionError> {
    let env = environment(library)?;
    let bytes = std::fs::read(model).map_err(|e| VisionError::no_detector(model.display().to_string(), e))?;
    let bytes = free_input_and_output_shapes(&bytes)
        .map_err(|e| VisionError::no_detector(format!("{} is not an ONNX model this code understands", model.display()), e))?;
    let failed = |e: ort::Error| VisionError::no_detector(format!("ONNX Runtime cannot load {}", model.display()), e);
    // The builder's errors carry the builder, for recovery; the error alone is kept.
    let failed_building = |e: ort::Error<ort::session::builder::SessionBuilder>| failed(e.into());
    let builder = Session::builder(env).map_err(failed)?;
    // No memory pattern: it keeps a peak-sized block per session (one per worker
    // thread); measured at 12 MP, 182 -> 152 MB peak RSS for detect, same speed.
    // (Without the arena too, malloc churn made it 310 MB and slower.)
    let builder = builder.with_memory_pattern(false).map_err(failed_building)?;
    let builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(failed_building)?;
    // One thread per session: the stage runs one image per worker thread.
    let builder = builder.with_intra_threads(1).map_err(failed_building)?;
    let mut builder = builder.with_inter_threads(1).map_err(failed_building)?;
    let session = builder.commit_from_memory(&bytes).map_err(failed)?;
    Ok(session)
}

/// A few detectors (each an ONNX Runtime session and its buffers) shared by a
/// process's worker threads, each used by one thread at a time.
///
/// ONNX Runtime allows concurrent runs on one session, but `ort` takes a session
/// mutably to run it, and a detector keeps its buffers beside it; so threads take
/// turns. A session's working memory is its largest cost, and with two worker
/// threads one YuNet session was measured as fast as two and 15 MiB smaller.
pub struct Shared<T> {
    items: Vec<Mutex<T>>,
    /// Where the next caller starts looking for a free one.
    next: AtomicUsize,
}

impl<T> Shared<T> {
    /// Shares `items` (at least one).
    pub fn new(items: Vec<T>) -> Self {
        assert!(!items.is_empty(), "a shared pool needs at least one item");
        Self { items: items.into_iter().map(Mutex::new).collect(), next: AtomicUsize::new(0) }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Never empty; here for completeness.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// One that no other thread is using, else the next in turn (waiting for it).
    pub fn get(&self) -> MutexGuard<'_, T> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.items.len();
        for i in 0..n {
            if let Ok(item) = self.items[(start + i) % n].try_lock() {
                return item;
            }
        }
        // A panic inside a run leaves the session itself usable.
        self.items[start % n].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
/// serves every input size (the file pins 1x3x120x160): `graph.input["input"]`
/// and every `graph.output` get symbolic dimensions; the rest of the model is
/// written back as it was read (unknown fields included).
fn free_input_and_output_shapes(model: &[u8]) -> Result<Vec<u8>, String> {
    let mut model = ModelProto::parse_from_bytes(model).map_err(|e| e.to_string())?;
    let graph = model.graph.as_mut().ok_or("the model has no graph")?;
    let mut found = false;
    for info in graph.input.iter_mut().filter(|i| i.name == "input").chain(graph.output.iter_mut()) {
        found = true;
        let tensor = info.type_.as_mut().and_then(|t| t.value.as_mut());
        let Some(type_proto::Value::TensorType(tensor)) = tensor else { continue };
        if let Some(shape) = tensor.shape.as_mut() {
            for (i, dim) in shape.dim.iter_mut().enumerate() {
                dim.set_dim_param(format!("free{}", i + 1));
            }
        }
    }
    if !found {
        return Err("the graph has no input named `input`".into());
    }
    model.write_to_bytes().map_err(|e| e.to_string())
}

/// A digest of the network in `model` (an ONNX file): sha256 over its weights and its
/// operators, each in a canonical order. Converting the same network again (tf2onnx)
/// gives a file whose bytes differ (node order and names follow the converter's
/// traversal), but the same digest; a different or damaged network gives another.
pub fn network_sha256(model: &[u8]) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let model = ModelProto::parse_from_bytes(model).map_err(|e| e.to_string())?;
    let graph = model.graph.as_ref().ok_or("the model has no graph")?;
    let hex = |digest: &[u8]| digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut weights: Vec<String> = graph
        .initializer
        .iter()
        .map(|t| {
            let mut h = Sha256::new();
            h.update(t.data_type.to_le_bytes());
            t.dims.iter().for_each(|d| h.update(d.to_le_bytes()));
            h.update(&t.raw_data);
            t.float_data.iter().for_each(|v| h.update(v.to_le_bytes()));
            t.int32_data.iter().for_each(|v| h.update(v.to_le_bytes()));
            t.int64_data.iter().for_each(|v| h.update(v.to_le_bytes()));
            t.double_data.iter().for_each(|v| h.update(v.to_le_bytes()));
            hex(&h.finalize())
        })
        .collect();
    weights.sort();
    let mut operators: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    operators.sort();
    let mut h = Sha256::new();
    weights.iter().for_each(|w| h.update(format!("{w}\n")));
    operators.iter().for_each(|o| h.update(format!("{o}\n")));
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_pool_hands_out_a_free_item_and_waits_when_all_are_taken() {
        let pool = Shared::new(vec![1, 2]);
        let first = pool.get();
        let second = pool.get();
        assert_ne!(*first, *second, "two callers at once get different items");
        drop(first);
        assert_eq!(*pool.get(), 1, "the free one, whatever the turn");
        drop(second);
        // With every item taken, a caller waits for one rather than failing.
        let one = Shared::new(vec![7]);
        let held = one.get();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| *one.get());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished(), "waits while the only item is in use");
            drop(held);
            assert_eq!(waiter.join().unwrap(), 7);
        });
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let f = |x: f32, score| FaceBox::new(x, 0.0, 100.0, 100.0, score);
        let kept = non_maximum_suppression(vec![f(0.0, 0.8), f(5.0, 0.9), f(300.0, 0.85)], 0.3);
        assert_eq!(kept.iter().map(|k| k.x).collect::<Vec<_>>(), vec![5.0, 300.0]);
    }

    #[test]
    fn the_network_digest_is_the_topologys_and_changes_with_a_weight() {
        let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/retinaface_mnv2.onnx");
        let mut bytes = std::fs::read(&shared).unwrap_or_else(|e| panic!("{}: {e}", shared.display()));
        assert_eq!(network_sha256(&bytes).unwrap(), facepipe_core::topology::RETINAFACE_NETWORK_SHA256);
        // A byte in the middle of the file is a weight's.
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        assert_ne!(network_sha256(&bytes).unwrap(), facepipe_core::topology::RETINAFACE_NETWORK_SHA256);
        assert!(network_sha256(b"not protobuf at all").is_err());
    }

    #[test]
    fn shape_rewrite_frees_the_sizes_and_keeps_the_rest() {
        use onnx_protobuf::tensor_shape_proto::Dimension;
        use onnx_protobuf::{GraphProto, TensorShapeProto, TypeProto, ValueInfoProto};
        let fixed = |name: &str| {
            let mut shape = TensorShapeProto::new();
            for size in [1, 3, 120, 160] {
                let mut dim = Dimension::new();
                dim.set_dim_value(size);
                shape.dim.push(dim);
            }
            let mut ty = TypeProto::new();
            ty.mut_tensor_type().elem_type = 1; // FLOAT
            ty.mut_tensor_type().shape = protobuf::MessageField::some(shape);
            let mut info = ValueInfoProto::new();
            info.name = name.into();
            info.type_ = protobuf::MessageField::some(ty);
            info
        };
        let mut graph = GraphProto::new();
        graph.name = "g".into();
        graph.input = vec![fixed("input"), fixed("other")];
        graph.output = vec![fixed("scores")];
        let mut model = ModelProto::new();
        model.ir_version = 7;
        model.graph = protobuf::MessageField::some(graph);

        let rewritten = ModelProto::parse_from_bytes(&free_input_and_output_shapes(&model.write_to_bytes().unwrap()).unwrap()).unwrap();
        let dims = |info: &ValueInfoProto| -> Vec<String> {
            info.type_.tensor_type().shape.dim.iter().map(|d| if d.has_dim_param() { d.dim_param().to_string() } else { d.dim_value().to_string() }).collect()
        };
        let graph = rewritten.graph.as_ref().unwrap();
        assert_eq!(dims(&graph.input[0]), ["free1", "free2", "free3", "free4"]);
        assert_eq!(dims(&graph.input[1]), ["1", "3", "120", "160"], "only the input named `input` changes");
        assert_eq!(dims(&graph.output[0]), ["free1", "free2", "free3", "free4"]);
        assert_eq!((rewritten.ir_version, graph.name.as_str()), (7, "g"));
        assert!(free_input_and_output_shapes(b"\x08\x07").is_err(), "no graph: not a model we know");
        assert!(free_input_and_output_shapes(b"not protobuf at all").is_err());
    }
}

