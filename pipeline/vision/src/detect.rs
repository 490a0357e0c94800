//! Face detection: YuNet on ONNX Runtime (`model`, 2023mar by default), then YuNet on
//! OpenCV's DNN module (`opencv_model`, 2022mar for OpenCV 4.6) when ONNX Runtime does not
//! load or `engine = "opencv"`. When no YuNet file loads, detect refuses to serve, unless the
//! topology names the Haar cascade as `fallback` (or as the `detector` itself).
//!
//! With `second_pass` on (the default), YuNet on ONNX Runtime is the first of two passes:
//! a photo on which YuNet finds a box it is unsure of (a score inside the configured band)
//! is detected again by RetinaFace, a stronger network several times as costly, whose
//! boxes then stand for that photo. Photos YuNet is sure about cost nothing more. When the
//! second pass cannot run (its file is missing, fails its checksum or does not load, or
//! YuNet does not run on ONNX Runtime), detect refuses to serve unless the topology says
//! `required = false`; then it warns and YuNet decides alone.
//!
//! Every box carries YuNet's or RetinaFace's five landmarks. When the crop stage aligns
//! crops by the eyes, the landmarks of the faces it will crop are measured again on the
//! face turned upright ([`detect_faces_for`]), since YuNet's own lag behind a turned face.
//!
//! YuNet on ONNX Runtime and RetinaFace are loaded once per process and shared by
//! its worker threads ([`Shared`]: `sessions` and `second_pass.sessions` each, one by
//! default), since a session's working memory is its largest cost; only the input
//! size changes between images. YuNet on OpenCV and Haar are built once per thread.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use opencv::core::{self, Mat, Ptr, Rect, Size, Vector};
use opencv::objdetect::{CascadeClassifier, FaceDetectorYN};
use opencv::prelude::*;
use opencv::imgproc;

use super::decode::{self, Decoded};
use super::VisionError;
use facepipe_core::domain::Detector;
use facepipe_core::messages::{FaceBox, Landmarks};
use facepipe_core::telemetry::Step;
use super::retinaface::RetinaFace;
use super::onnx::Shared;
use super::yunet::OrtYunet;
use super::tiles;
use facepipe_core::topology::{CropAlign, CropParams, DetectFallback, DetectParams, DetectorKind, InferenceEngine};

/// Faces found in one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Width of the upright original.
    pub width: u32,
    /// Height of the upright original.
    pub height: u32,
    /// Faces in original pixels, highest score first.
    pub faces: Vec<FaceBox>,
    /// What decided the boxes: YuNet, RetinaFace (the second pass) or Haar.
    pub detector: Detector,
}

enum Model {
    YunetOrt {
        /// The first pass, shared by the process's threads.
        yunet: Arc<Shared<OrtYunet>>,
        /// The second pass, shared by the process's threads, when on and loaded.
        second: Option<Arc<RetinaFace>>,
        /// This thread's input buffer for the second pass.
        second_input: Vec<f32>,
    },
    Yunet(Ptr<FaceDetectorYN>),
    Haar(CascadeClassifier),
}

/// A loaded detector and the parameters it was built for.
struct Loaded {
    params: DetectParams,
    model: Model,
}

thread_local! {
    static DETECTOR: RefCell<Option<Loaded>> = const { RefCell::new(None) };
}

/// What a shared RetinaFace was loaded from; a live change to any of it loads another.
#[derive(Debug, Clone, PartialEq)]
struct SecondPassKey {
    model: PathBuf,
    network_sha256: String,
    library: Option<PathBuf>,
    sessions: usize,
}

/// What the shared YuNet sessions were loaded from; a live change to any of it loads others.
#[derive(Debug, Clone, PartialEq)]
struct YunetKey {
    model: PathBuf,
    library: Option<PathBuf>,
    sessions: usize,
}

/// The process's YuNet sessions on ONNX Runtime, shared by every worker thread.
static YUNET: Mutex<Option<(YunetKey, Arc<Shared<OrtYunet>>)>> = Mutex::new(None);

/// The process's RetinaFace, shared by every worker thread.
static SECOND_PASS: Mutex<Option<(SecondPassKey, Arc<RetinaFace>)>> = Mutex::new(None);

thread_local! {
    /// Why the configured second pass does not run on this thread's detector, if it does not.
    static SECOND_PASS_OFF: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn load(params: &DetectParams) -> Result<Model, VisionError> {
    SECOND_PASS_OFF.with(|off| *off.borrow_mut() = None);
    if params.detector == DetectorKind::Haar {
        second_pass_cannot_run(params, "it runs after YuNet, and the topology names the Haar cascade as the detector")?;
        return load_haar(&params.haar_cascade).map(Model::Haar);
    }
    // Why each YuNet attempt failed, for the error (or the fallback's warning).
    let mut attempts = Vec::new();
    if params.engine == InferenceEngine::Onnxruntime {
        match params.model.as_deref() {
            Some(path) if path.is_file() => match shared_yunet(path, params) {
                Ok(yunet) => {
                    let second = match shared_second_pass(params) {
                        Ok(second) => second,
                        Err(why) => {
                            second_pass_cannot_run(params, &why)?;
                            None
                        }
                    };
                    return Ok(Model::YunetOrt { yunet, second, second_input: Vec::new() });
                }
                Err(e) => {
                    // Same network, same quality floor, only slower: announced, not refused.
                    tracing::warn!(
                        error = %e,
                        "YuNet on ONNX Runtime unavailable; running YuNet on OpenCV's DNN module, several times slower (scripts/setup installs ONNX Runtime)"
                    );
                    attempts.push(format!("ONNX Runtime: {e}"));
                }
            },
            Some(path) => attempts.push(format!("model file {} not found", path.display())),
            None => attempts.push("no `model` configured".to_string()),
        }
    }
    let (model, score_threshold) = opencv_yunet(params);
    match model {
        Some(path) if path.is_file() => {
            let model = FaceDetectorYN::create(
                &path.to_string_lossy(),
                "",
                Size::new(320, 320),
                score_threshold,
                params.nms_threshold,
                5000,
                0,
                0,
            );
            match model {
                Ok(model) => {
                    second_pass_cannot_run(params, "it needs YuNet on ONNX Runtime, which does not run here")?;
                    return Ok(Model::Yunet(model));
                }
                Err(e) => attempts.push(format!(
                    "OpenCV cannot load {} ({e}; OpenCV 4.6 needs face_detection_yunet_2022mar.onnx as opencv_model)",
                    path.display()
                )),
            }
        }
        Some(path) => attempts.push(format!("OpenCV's model file {} not found", path.display())),
        None => attempts.push("no `opencv_model` configured".to_string()),
    }
    let why = attempts.join("; ");
    match params.fallback {
        DetectFallback::Haar => {
            tracing::warn!(reason = %why, "YuNet does not load; running the Haar fallback the topology names, which finds far fewer faces");
            second_pass_cannot_run(params, "it runs after YuNet, which does not load")?;
            load_haar(&params.haar_cascade).map(Model::Haar)
        }
        DetectFallback::None => Err(VisionError::no_detector_because(format!(
            "YuNet does not load: {why} (fix stages.detect.params.model, or name a fallback with stages.detect.params.fallback = \"haar\")"
        ))),
    }
}

/// The process's YuNet sessions for `model` (loaded on first use).
fn shared_yunet(model: &Path, params: &DetectParams) -> Result<Arc<Shared<OrtYunet>>, VisionError> {
    let key = YunetKey { model: model.to_path_buf(), library: params.onnxruntime.clone(), sessions: params.sessions.max(1) };
    // Held while loading, so threads starting together load them once.
    let mut shared = YUNET.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((loaded, yunet)) = shared.as_ref() {
        if *loaded == key {
            return Ok(yunet.clone());
        }
    }
    let sessions = (0..key.sessions).map(|_| OrtYunet::load(model, params.onnxruntime.as_deref())).collect::<Result<Vec<_>, _>>()?;
    let yunet = Arc::new(Shared::new(sessions));
    *shared = Some((key, yunet.clone()));
    Ok(yunet)
}

/// The process's RetinaFace for `second_pass` (loaded on first use, after its checksum),
/// `None` when the pass is off, or why it cannot load.
fn shared_second_pass(params: &DetectParams) -> Result<Option<Arc<RetinaFace>>, String> {
    let Some(pass) = params.second_pass.active() else { return Ok(None) };
    let key = SecondPassKey {
        model: pass.model.clone(),
        network_sha256: pass.network_sha256.clone(),
        library: params.onnxruntime.clone(),
        sessions: pass.sessions,
    };
    // Held while loading, so threads starting together load it once.
    let mut shared = SECOND_PASS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((loaded, retinaface)) = shared.as_ref() {
        if *loaded == key {
            return Ok(Some(retinaface.clone()));
        }
    }
    check_network(&pass.model, &pass.network_sha256)?;
    let retinaface = Arc::new(RetinaFace::load(&pass.model, params.onnxruntime.as_deref(), pass.sessions).map_err(|e| e.to_string())?);
    *shared = Some((key, retinaface.clone()));
    Ok(Some(retinaface))
}

/// Whether the network in `path` has the digest `expected` ([`super::onnx::network_sha256`];
/// empty: not checked).
fn check_network(path: &Path, expected: &str) -> Result<(), String> {
    if expected.is_empty() {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e} (scripts/setup makes it)", path.display()))?;
    let found = super::onnx::network_sha256(&bytes).map_err(|e| format!("{} is not an ONNX model: {e}", path.display()))?;
    if found != expected.to_ascii_lowercase() {
        return Err(format!(
            "{} holds a network whose sha256 is {found}, not the {expected} the topology expects (remake it with scripts/setup)",
            path.display()
        ));
    }
    Ok(())
}

/// The configured second pass cannot run, for `why`: an error when the topology requires
/// it, else a warning, remembered for [`Running::second_pass_off`].
fn second_pass_cannot_run(params: &DetectParams, why: &str) -> Result<(), VisionError> {
    let Some(pass) = params.second_pass.active() else { return Ok(()) };
    if pass.required {
        return Err(VisionError::no_detector_because(format!(
            "the second pass (RetinaFace) cannot run: {why} (set stages.detect.params.second_pass.required = false to run YuNet alone, or enabled = false)"
        )));
    }
    tracing::warn!(reason = %why, "second pass unavailable: YuNet alone decides every photo, and finds fewer faces (second_pass.required = false)");
    SECOND_PASS_OFF.with(|off| *off.borrow_mut() = Some(why.to_string()));
    Ok(())
}

/// The YuNet file and score threshold OpenCV's DNN module runs (`opencv_model`, else `model`).
fn opencv_yunet(params: &DetectParams) -> (Option<&Path>, f32) {
    (
        params.opencv_model.as_deref().or(params.model.as_deref()),
        params.opencv_score_threshold.unwrap_or(params.score_threshold),
    )
}

fn load_haar(path: &Path) -> Result<CascadeClassifier, VisionError> {
    let cascade = CascadeClassifier::new(path)
        .map_err(|e| VisionError::no_detector(path.display().to_string(), e))?;
    if cascade.empty()? {
        return Err(VisionError::no_detector_because(format!(
            "Haar cascade {} does not load (install opencv-data)",
            path.display()
        )));
    }
    Ok(cascade)
}

/// What actually runs for `params` on this machine, after any fallback.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    /// YuNet, or Haar where the topology names it.
    pub detector: Detector,
    /// `onnxruntime`, or `opencv` (OpenCV's DNN module for YuNet, or the Haar cascade).
    pub engine: &'static str,
    /// File name of the model or cascade that runs.
    pub model: String,
    /// Score threshold applied to YuNet's boxes (Haar has none: 0).
    pub score_threshold: f32,
    /// File name of the second pass's model when it runs (RetinaFace on ONNX Runtime).
    pub second_pass: Option<String>,
    /// Why the configured second pass does not run (only with `required = false`).
    pub second_pass_off: Option<String>,
}

/// Loads the detector `params` yields on this thread and says what it is.
pub fn running(params: &DetectParams) -> Result<Running, VisionError> {
    with_model(params, |model| {
        let (engine, path, score_threshold) = match model {
            Model::YunetOrt { .. } => ("onnxruntime", params.model.as_deref(), params.score_threshold),
            Model::Yunet(_) => {
                let (path, score_threshold) = opencv_yunet(params);
                ("opencv", path, score_threshold)
            }
            Model::Haar(_) => ("opencv", Some(params.haar_cascade.as_path()), 0.0),
        };
        let file_name = |path: Option<&Path>| path.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        let second_pass = match model {
            Model::YunetOrt { second: Some(_), .. } => file_name(Some(params.second_pass.model.as_path())),
            _ => None,
        };
        Ok(Running {
            detector: model_name(model),
            engine,
            model: file_name(path).unwrap_or_default(),
            score_threshold,
            second_pass,
            second_pass_off: SECOND_PASS_OFF.with(|off| off.borrow().clone()),
        })
    })
}

fn model_name(model: &Model) -> Detector {
    match model {
        Model::Yunet(_) | Model::YunetOrt { .. } => Detector::Yunet,
        Model::Haar(_) => Detector::Haar,
    }
}

fn with_model<T>(
    params: &DetectParams,
    f: impl FnOnce(&mut Model) -> Result<T, VisionError>,
) -> Result<T, VisionError> {
    DETECTOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|l| &l.params != params) {
            *slot = Some(Loaded { params: params.clone(), model: load(params)? });
        }
        f(&mut slot.as_mut().expect("just loaded").model)
    })
}

/// Decodes `bytes` at the cheapest scale that still gives `params.width` pixels
/// on the longer side, and returns the faces in original-image pixels.
pub fn detect_faces(bytes: &[u8], params: &DetectParams) -> Result<Detection, VisionError> {
    detect_faces_for(bytes, params, None)
}

/// [`detect_faces`], for a crop stage running `crop`: when it aligns crops by the
/// eyes, the landmarks of the faces it will crop are refined first (see [`refine_landmarks`]).
///
/// With `min_face` set, and faces of that size too small for the whole-photo pass, the
/// photo is decoded at the scale [`tiles::Plan`] picks and detected in tiles ([`detect_tiled`]).
pub fn detect_faces_for(bytes: &[u8], params: &DetectParams, crop: Option<&CropParams>) -> Result<Detection, VisionError> {
    let header = decode::probe(bytes, params.max_megapixels)?;
    let plan = |width, height| params.min_face.and_then(|m| tiles::Plan::for_photo(width, height, params.width, params.upscale, m));
    // The long side is the same upright or not, so the header's plan sizes the decode.
    let needed = plan(header.width, header.height).map_or(params.width, |p| p.width.max(p.height));
    let decoded = decode::decode(bytes, header, decode::reduction_for(header, needed))?;
    match plan(decoded.full_width, decoded.full_height) {
        Some(plan) => detect_tiled(&decoded, &plan, params, crop),
        None => detect_decoded(&decoded, params, crop),
    }
}

/// The decoded photo scaled to the whole-photo pass's size (`width` on the longer side;
/// enlarged only with `upscale`), with the original pixels per input pixel.
fn whole_photo_input(decoded: &Decoded, params: &DetectParams) -> Result<(Mat, f64, f64), VisionError> {
    let image = &decoded.image;
    let long = image.cols().max(image.rows());
    let mut factor = params.width as f64 / long as f64;
    if !params.upscale {
        factor = factor.min(1.0);
    }
    let input = if (factor - 1.0).abs() > 1e-3 {
        // INTER_AREA only where it matters (strong shrinking); it is several times
        // slower than bilinear at ratios like 800 -> 640.
        let interpolation = if factor < 0.5 { imgproc::INTER_AREA } else { imgproc::INTER_LINEAR };
        let mut scaled = Mat::default();
        imgproc::resize(image, &mut scaled, Size::new(0, 0), factor, factor, interpolation)?;
        scaled
    } else {
        image.clone()
    };
    let (sx, sy) = decoded.scale();
    let (fx, fy) = (sx * image.cols() as f64 / input.cols() as f64, sy * image.rows() as f64 / input.rows() as f64);
    Ok((input, fx, fy))
}

/// Where a box found on some image lies in the original: `origin` is that image's top-left
/// corner and `per_pixel` the original pixels per pixel of it, on each axis.
#[derive(Debug, Clone, Copy)]
struct ToOriginal {
    origin: (f64, f64),
    per_pixel: (f64, f64),
    /// The original's width and height, to clip to.
    size: (f32, f32),
}

impl ToOriginal {
    /// `f` in original pixels, clipped to the photo; `None` when less than a pixel is left.
    fn map(&self, f: FaceBox) -> Option<FaceBox> {
        let ((ox, oy), (px, py), (w, h)) = (self.origin, self.per_pixel, self.size);
        let x0 = (ox + f.x as f64 * px).max(0.0) as f32;
        let y0 = (oy + f.y as f64 * py).max(0.0) as f32;
        let x1 = (ox + (f.x + f.w) as f64 * px).min(w as f64) as f32;
        let y1 = (oy + (f.y + f.h) as f64 * py).min(h as f64) as f32;
        // Landmarks are mapped, not clipped: an eye may lie just outside a clipped box.
        let landmarks = f.landmarks.map(|l| l.map(|[x, y]| [(ox + x as f64 * px) as f32, (oy + y as f64 * py) as f32]));
        (x1 - x0 >= 1.0 && y1 - y0 >= 1.0).then_some(FaceBox { x: x0, y: y0, w: x1 - x0, h: y1 - y0, score: f.score, landmarks })
    }
}

/// Detects faces on an already decoded image (refining landmarks for `crop` as [`detect_faces_for`] does).
pub fn detect_decoded(decoded: &Decoded, params: &DetectParams, crop: Option<&CropParams>) -> Result<Detection, VisionError> {
    // Scaling to the detector's input is part of the step.
    let _timer = Step::Detect.start();
    let (input, fx, fy) = whole_photo_input(decoded, params)?;
    let to_original = ToOriginal { origin: (0.0, 0.0), per_pixel: (fx, fy), size: (decoded.full_width as f32, decoded.full_height as f32) };

    with_model(params, |model| {
        let mut detector = model_name(model);
        let raw = match model {
            Model::YunetOrt { yunet, second, second_input } => match (second, params.second_pass.active()) {
                (Some(retinaface), Some(pass)) => {
                    let boxes = yunet.get().detect(&input, params.score_threshold.min(pass.uncertain_from), params.nms_threshold)?;
                    if boxes.iter().any(|b| pass.is_uncertain(b.score)) {
                        detector = Detector::Retinaface;
                        retinaface.detect(second_input, &input, pass.score_threshold)?
                    } else {
                        boxes.into_iter().filter(|b| b.score >= params.score_threshold).collect()
                    }
                }
                _ => yunet.get().detect(&input, params.score_threshold, params.nms_threshold)?,
            },
            Model::Yunet(net) => run_yunet(net, &input)?,
            Model::Haar(cascade) => run_haar(cascade, &input)?,
        };
        let mut faces: Vec<FaceBox> = raw.into_iter().filter_map(|f| to_original.map(f)).collect();
        faces.sort_by(|a, b| b.score.total_cmp(&a.score));
        refine_chosen(model, params, crop, &input, (fx, fy), &mut faces)?;
        Ok(Detection { width: decoded.full_width, height: decoded.full_height, faces, detector })
    })
}

/// Refines the landmarks of the faces `crop` will take, when it aligns by the eyes, on
/// `input` (`per_pixel`: original pixels per pixel of it).
fn refine_chosen(
    model: &mut Model,
    params: &DetectParams,
    crop: Option<&CropParams>,
    input: &Mat,
    (fx, fy): (f64, f64),
    faces: &mut [FaceBox],
) -> Result<(), VisionError> {
    let Some(crop) = crop.filter(|c| c.align == CropAlign::Eyes) else { return Ok(()) };
    for i in super::crop::chosen_faces(faces, crop) {
        let face = faces[i];
        let in_input = |[x, y]: [f32; 2]| [(x as f64 / fx) as f32, (y as f64 / fy) as f32];
        let [x, y] = in_input([face.x, face.y]);
        let on_input = FaceBox {
            landmarks: face.landmarks.map(|l| l.map(in_input)),
            ..FaceBox::new(x, y, (face.w as f64 / fx) as f32, (face.h as f64 / fy) as f32, face.score)
        };
        if let Some(refined) = refine_landmarks(model, params, input, &on_input)? {
            faces[i].landmarks = Some(refined.map(|[x, y]| [(x as f64 * fx) as f32, (y as f64 * fy) as f32]));
        }
    }
    Ok(())
}

/// YuNet (or what runs in its place) on one image, down to `threshold`.
fn first_pass(model: &mut Model, image: &Mat, threshold: f32, nms_threshold: f32) -> Result<Vec<FaceBox>, VisionError> {
    match model {
        Model::YunetOrt { yunet, .. } => yunet.get().detect(image, threshold, nms_threshold),
        Model::Yunet(net) => run_yunet(net, image),
        Model::Haar(cascade) => run_haar(cascade, image),
    }
}

/// Side, in pixels, of the square RetinaFace checks an uncertain box on ([`VERIFY_SPAN`]
/// times the face's side, so the face is about 50 px there, well within what RetinaFace
/// finds; a larger square costs more and found no more on the sheets).
const VERIFY_SIDE: f64 = 128.0;

/// The checked square's side, in faces.
const VERIFY_SPAN: f64 = 2.5;

/// Detection with `min_face` ([`tiles`]): YuNet on the whole photo at `width` (the large
/// faces) and on every tile of `plan` (the small ones), merged in original pixels. With
/// the second pass on, each box YuNet is unsure of is checked by RetinaFace on its own
/// neighbourhood ([`VERIFY_SIDE`]) and kept only if RetinaFace finds it there: the cost
/// follows the number of doubtful faces, not the photo's size.
fn detect_tiled(decoded: &Decoded, plan: &tiles::Plan, params: &DetectParams, crop: Option<&CropParams>) -> Result<Detection, VisionError> {
    let _timer = Step::Detect.start();
    let image = &decoded.image;
    let (sx, sy) = decoded.scale();
    let size = (decoded.full_width as f32, decoded.full_height as f32);
    let (input, fx, fy) = whole_photo_input(decoded, params)?;
    // Decoded pixels per scaled (tile) pixel.
    let (kx, ky) = (image.cols() as f64 / plan.width as f64, image.rows() as f64 / plan.height as f64);

    with_model(params, |model| {
        let verifying = matches!(model, Model::YunetOrt { second: Some(_), .. }) && params.second_pass.active().is_some();
        let threshold = if verifying { params.score_threshold.min(params.second_pass.uncertain_from) } else { params.score_threshold };
        let whole = ToOriginal { origin: (0.0, 0.0), per_pixel: (fx, fy), size };
        let mut found: Vec<FaceBox> = first_pass(model, &input, threshold, params.nms_threshold)?.into_iter().filter_map(|f| whole.map(f)).collect();
        let mut tile_image = Mat::default();
        for tile in plan.tiles() {
            // The tile's rectangle in decoded pixels, resized on its own: one tile in memory.
            let x0 = (tile.x as f64 * kx).floor() as i32;
            let y0 = (tile.y as f64 * ky).floor() as i32;
            let x1 = (((tile.x + tile.w) as f64 * kx).ceil() as i32).min(image.cols());
            let y1 = (((tile.y + tile.h) as f64 * ky).ceil() as i32).min(image.rows());
            let source = Mat::roi(image, Rect::new(x0, y0, x1 - x0, y1 - y0))?;
            let interpolation = if kx > 2.0 { imgproc::INTER_AREA } else { imgproc::INTER_LINEAR };
            imgproc::resize(&source, &mut tile_image, Size::new(tile.w as i32, tile.h as i32), 0.0, 0.0, interpolation)?;
            let on_tile = ToOriginal {
                origin: (x0 as f64 * sx, y0 as f64 * sy),
                per_pixel: (sx * (x1 - x0) as f64 / tile.w as f64, sy * (y1 - y0) as f64 / tile.h as f64),
                size,
            };
            let boxes = first_pass(model, &tile_image, threshold, params.nms_threshold)?;
            // Faces wider than the overlap may be cut anywhere: the whole-photo pass's.
            let small = |f: &FaceBox| f.w.max(f.h) <= plan.overlap as f32;
            found.extend(boxes.into_iter().filter(|f| small(f) && !tile.cuts(f)).filter_map(|f| on_tile.map(f)));
        }
        let merged = tiles::merge(found, params.nms_threshold);
        let mut detector = model_name(model);
        let mut faces = Vec::with_capacity(merged.len());
        match model {
            Model::YunetOrt { second: Some(retinaface), second_input, .. } if verifying => {
                let pass = &params.second_pass;
                for face in merged {
                    if face.score >= pass.uncertain_to {
                        faces.push(face);
                    } else if pass.is_uncertain(face.score) {
                        detector = Detector::Retinaface;
                        faces.extend(verify(retinaface, second_input, decoded, &face, pass.score_threshold)?);
                    } else if face.score >= params.score_threshold {
                        faces.push(face);
                    }
                }
            }
            _ => faces.extend(merged.into_iter().filter(|f| f.score >= threshold)),
        }
        faces.sort_by(|a, b| b.score.total_cmp(&a.score));
        refine_chosen(model, params, crop, image, (sx, sy), &mut faces)?;
        Ok(Detection { width: decoded.full_width, height: decoded.full_height, faces, detector })
    })
}

/// RetinaFace's box for `face` (original pixels) on its neighbourhood in the decoded
/// photo, or `None` when RetinaFace finds no face there scoring `threshold`. The
/// neighbourhood is always sampled to the same size (black beyond the photo's edge), so
/// ONNX Runtime plans its memory once for every check.
fn verify(retinaface: &RetinaFace, buffer: &mut Vec<f32>, decoded: &Decoded, face: &FaceBox, threshold: f32) -> Result<Option<FaceBox>, VisionError> {
    let (sx, sy) = decoded.scale();
    let (cx, cy) = ((face.x + face.w / 2.0) as f64 / sx, (face.y + face.h / 2.0) as f64 / sy);
    let side = VERIFY_SPAN * face.w.max(face.h) as f64 / sx;
    let window = super::crop::TurnedWindow { cx, cy, side, angle: 0.0 };
    let region = super::crop::warp(&decoded.image, &window.affine(VERIFY_SIDE), VERIFY_SIDE as i32, core::BORDER_CONSTANT)?;
    // Region pixel u lies at cx + (u - n/2) * step in decoded pixels.
    let step = side / VERIFY_SIDE;
    let to_original = ToOriginal {
        origin: ((cx - side / 2.0) * sx, (cy - side / 2.0) * sy),
        per_pixel: (step * sx, step * sy),
        size: (decoded.full_width as f32, decoded.full_height as f32),
    };
    let best = retinaface
        .detect(buffer, &region, threshold)?
        .into_iter()
        .filter_map(|f| to_original.map(f))
        .map(|f| (tiles::iou(&f, face), f))
        .filter(|(overlap, _)| *overlap >= 0.3)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    Ok(best.map(|(_, f)| f))
}

/// Side of the square on which landmarks are refined (a multiple of 32, as both networks want).
const REFINE_SIDE: i32 = 192;

/// A refinement round that moves the eye line by less than this ends the refinement.
const SETTLED_DEGREES: f64 = 1.0;

/// Landmarks of `face` (in `input`'s pixels) measured again, for eye alignment.
///
/// YuNet's landmarks lag behind a turned face (measured on portraits turned 30
/// degrees: the eye line read 4 degrees off level, not 30), and any detector's are
/// best on an upright face seen large. So the face's neighbourhood (twice its size)
/// is turned by the current eye angle, enlarged to [`REFINE_SIDE`], and detected
/// again; its eye angle is the new estimate. At most two rounds with RetinaFace,
/// three with YuNet alone, which closes less of the gap each round; a round that
/// barely moves the estimate is the last. `None` when the
/// detector gives no landmarks (Haar, OpenCV's YuNet) or the face has none.
fn refine_landmarks(model: &mut Model, params: &DetectParams, input: &Mat, face: &FaceBox) -> Result<Option<Landmarks>, VisionError> {
    let Some(mut landmarks) = face.landmarks else { return Ok(None) };
    let Model::YunetOrt { yunet, second, second_input } = model else { return Ok(None) };
    let rounds = if second.is_some() { 2 } else { 3 };
    let n = REFINE_SIDE as f64;
    // A large face is first shrunk with area averaging: bilinear sampling alone would
    // skip pixels, and landmarks on an aliased face come out several degrees off.
    let side = 2.0 * face.w.max(face.h) as f64;
    let shrink = (1.5 * n / side).min(1.0);
    let shrunk;
    let (image, ax, ay) = if shrink < 1.0 {
        let mut out = Mat::default();
        imgproc::resize(input, &mut out, Size::new(0, 0), shrink, shrink, imgproc::INTER_AREA)?;
        shrunk = out;
        let (ax, ay) = (shrunk.cols() as f64 / input.cols() as f64, shrunk.rows() as f64 / input.rows() as f64);
        (&shrunk, ax, ay)
    } else {
        (input, 1.0, 1.0)
    };
    let (cx, cy) = ((face.x as f64 + face.w as f64 / 2.0) * ax, (face.y as f64 + face.h as f64 / 2.0) * ay);
    let side = side * ax;
    landmarks = landmarks.map(|[x, y]| [(x as f64 * ax) as f32, (y as f64 * ay) as f32]);
    for _ in 0..rounds {
        let turned = super::crop::TurnedWindow { cx, cy, side, angle: landmarks.eye_angle() };
        let to_input = turned.affine(n);
        let region = super::crop::warp(image, &to_input, REFINE_SIDE, opencv::core::BORDER_CONSTANT)?;
        let found = match second {
            Some(retinaface) => {
                let threshold = params.second_pass.score_threshold;
                retinaface.detect(second_input, &region, threshold)?
            }
            None => yunet.get().detect(&region, params.score_threshold.min(0.5), params.nms_threshold)?,
        };
        // The face nearest the middle, and not a small one beside it.
        let centre_distance = |f: &FaceBox| ((f.x + f.w / 2.0) as f64 - n / 2.0).hypot((f.y + f.h / 2.0) as f64 - n / 2.0);
        let Some(again) = found
            .iter()
            .filter(|f| f.landmarks.is_some() && f.w.max(f.h) as f64 >= n / 5.0 && centre_distance(f) <= n / 4.0)
            .min_by(|a, b| centre_distance(a).total_cmp(&centre_distance(b)))
        else {
            break; // not seen again: keep what we have
        };
        let map = |[u, v]: [f32; 2]| {
            let [[a, b, c], [d, e, f]] = to_input;
            let (u, v) = (u as f64 - 0.5, v as f64 - 0.5); // landmark coordinates to pixel indices
            [(a * u + b * v + c) as f32, (d * u + e * v + f) as f32]
        };
        let before = landmarks.eye_angle();
        landmarks = again.landmarks.expect("filtered").map(map);
        // Seen upright already (the usual photo): a further round would not move it.
        if (landmarks.eye_angle() - before).abs() < SETTLED_DEGREES {
            break;
        }
    }
    Ok(Some(landmarks.map(|[x, y]| [(x as f64 / ax) as f32, (y as f64 / ay) as f32])))
}

/// Smallest side YuNet 2022mar accepts (measured: 48 fails, 64 runs; its
/// deepest feature maps are 1/32 of an input padded to a multiple of 32).
const YUNET_MIN_SIDE: i32 = 64;

fn run_yunet(net: &mut Ptr<FaceDetectorYN>, input: &Mat) -> Result<Vec<FaceBox>, VisionError> {
    // A sliver (e.g. 4000x20 scaled to 640x3) is padded with black below and to the right, so
    // coordinates stay those of the input.
    let padded;
    let input = if input.rows() < YUNET_MIN_SIDE || input.cols() < YUNET_MIN_SIDE {
        let mut out = Mat::default();
        core::copy_make_border(
            input,
            &mut out,
            0,
            (YUNET_MIN_SIDE - input.rows()).max(0),
            0,
            (YUNET_MIN_SIDE - input.cols()).max(0),
            core::BORDER_CONSTANT,
            core::Scalar::all(0.0),
        )?;
        padded = out;
        &padded
    } else {
        input
    };
    net.set_input_size(Size::new(input.cols(), input.rows()))?;
    let mut out = Mat::default();
    net.detect(input, &mut out)?;
    // One row per face: x, y, w, h, five landmarks (x, y), score.
    let mut faces = Vec::with_capacity(out.rows().max(0) as usize);
    for row in 0..out.rows() {
        let v = |col: i32| out.at_2d::<f32>(row, col).copied();
        let mut landmarks = [[0.0; 2]; 5];
        for (k, point) in landmarks.iter_mut().enumerate() {
            *point = [v(4 + 2 * k as i32)?, v(5 + 2 * k as i32)?];
        }
        let landmarks = Some(Landmarks(landmarks));
        faces.push(FaceBox { x: v(0)?, y: v(1)?, w: v(2)?, h: v(3)?, score: v(14)?, landmarks });
    }
    Ok(faces)
}

fn run_haar(cascade: &mut CascadeClassifier, input: &Mat) -> Result<Vec<FaceBox>, VisionError> {
    let mut gray = Mat::default();
    imgproc::cvt_color(input, &mut gray, imgproc::COLOR_BGR2GRAY, 0)?;
    let mut equalized = Mat::default();
    imgproc::equalize_hist(&gray, &mut equalized)?;
    let mut rects = Vector::<Rect>::new();
    cascade.detect_multi_scale(&equalized, &mut rects, 1.1, 5, 0, Size::new(24, 24), Size::default())?;
    // Haar gives no calibrated confidence; every accepted box scores 1.
    Ok(rects
        .iter()
        .map(|r| FaceBox::new(r.x as f32, r.y as f32, r.width as f32, r.height as f32, 1.0))
        .collect())
}

/// Sets OpenCV's own worker-thread count (0 = sequential); stages run one image
/// per worker thread, so nested OpenCV threads would only oversubscribe the cores.
pub fn set_opencv_threads(n: i32) {
    if let Err(e) = core::set_num_threads(n) {
        tracing::warn!(error = %e, "cannot set OpenCV thread count");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opencv_runs_its_own_model_and_threshold_else_the_main_ones() {
        let mut params = DetectParams {
            model: Some("a/2023mar.onnx".into()),
            score_threshold: 0.7,
            ..DetectParams::default()
        };
        assert_eq!(opencv_yunet(&params), (Some(Path::new("a/2023mar.onnx")), 0.7));
        params.opencv_model = Some("b/2022mar.onnx".into());
        params.opencv_score_threshold = Some(0.8);
        assert_eq!(opencv_yunet(&params), (Some(Path::new("b/2022mar.onnx")), 0.8));
    }
}
