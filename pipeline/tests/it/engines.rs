//! YuNet on ONNX Runtime must find what `cv::FaceDetectorYN` finds: the same
//! model with OpenCV 4.6's pre- and post-processing, so the same boxes and
//! scores and landmarks (up to float noise) on real photos.

use opencv::core::{Mat, Rect, Size, Vector};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::objdetect::FaceDetectorYN;
use opencv::prelude::*;
use facepipe_core::messages::{FaceBox, Landmarks};
use facepipe_vision::yunet::{OrtYunet, Release};
use crate::support::{labelled_photos, onnxruntime_library, shared_dir};

const THRESHOLD: f32 = 0.5;
const NMS: f32 = 0.3;

fn box_iou(a: &FaceBox, b: &FaceBox) -> f32 {
    let iw = ((a.x + a.w).min(b.x + b.w) - a.x.max(b.x)).max(0.0);
    let ih = ((a.y + a.h).min(b.y + b.h) - a.y.max(b.y)).max(0.0);
    let inter = iw * ih;
    inter / (a.w * a.h + b.w * b.h - inter)
}

/// Whether both boxes carry landmarks, each pair within 3% of the box's width (and a pixel) of the other.
fn landmarks_agree(a: &FaceBox, b: &FaceBox) -> bool {
    let (Some(la), Some(lb)) = (a.landmarks, b.landmarks) else { return false };
    la.0.iter().zip(lb.0).all(|(p, q)| (p[0] - q[0]).hypot(p[1] - q[1]) <= 1.0 + 0.03 * a.w)
}

/// Every box of `ours` that is clear of the threshold has a twin in `theirs`.
fn unmatched(ours: &[FaceBox], theirs: &[FaceBox]) -> Vec<FaceBox> {
    ours.iter()
        .filter(|a| a.score >= THRESHOLD + 0.03)
        .filter(|a| !theirs.iter().any(|b| box_iou(a, b) >= 0.9 && (a.score - b.score).abs() <= 0.03 && landmarks_agree(a, b)))
        .copied()
        .collect()
}

#[test]
fn onnxruntime_finds_the_faces_opencv_finds() {
    let model = shared_dir().join("models/face_detection_yunet_2022mar.onnx");
    let library = onnxruntime_library();
    let mut ort = OrtYunet::load(&model, Some(&library))
        .unwrap_or_else(|e| panic!("{e} (scripts/setup installs ONNX Runtime at {})", library.display()));
    let mut cv = FaceDetectorYN::create(&model.to_string_lossy(), "", Size::new(320, 320), THRESHOLD, NMS, 5000, 0, 0).unwrap();

    let root = shared_dir().join("data/faces");
    let (mut photos, mut compared) = (0, 0);
    for photo in labelled_photos().iter().step_by(3) {
        let bytes = std::fs::read(root.join(&photo.file)).unwrap();
        let image = imgcodecs::imdecode(&Vector::<u8>::from_slice(&bytes), imgcodecs::IMREAD_COLOR).unwrap();
        // At 640 on the longer side, cut to multiples of 32: OpenCV 4.6 runs the network
        // unpadded, ONNX Runtime on a padded input, and only there do their inputs agree.
        let factor = 640.0 / image.cols().max(image.rows()) as f64;
        let mut scaled = Mat::default();
        imgproc::resize(&image, &mut scaled, Size::new(0, 0), factor, factor, imgproc::INTER_LINEAR).unwrap();
        let (w, h) = (scaled.cols() / 32 * 32, scaled.rows() / 32 * 32);
        if w < 64 || h < 64 {
            continue;
        }
        let input = Mat::roi(&scaled, Rect::new(0, 0, w, h)).unwrap().try_clone().unwrap();

        cv.set_input_size(Size::new(w, h)).unwrap();
        let mut out = Mat::default();
        cv.detect(&input, &mut out).unwrap();
        let theirs: Vec<FaceBox> = (0..out.rows())
            .map(|r| {
                let v = |c| *out.at_2d::<f32>(r, c).unwrap();
                let landmarks = Some(Landmarks(std::array::from_fn(|k| [v(4 + 2 * k as i32), v(5 + 2 * k as i32)])));
                FaceBox { x: v(0), y: v(1), w: v(2), h: v(3), score: v(14), landmarks }
            })
            .collect();
        let ours = ort.detect(&input, THRESHOLD, NMS).unwrap();

        let missing = unmatched(&theirs, &ours);
        assert!(missing.is_empty(), "{}: OpenCV found {missing:?}, ONNX Runtime did not (it found {ours:?})", photo.file);
        let extra = unmatched(&ours, &theirs);
        assert!(extra.is_empty(), "{}: ONNX Runtime found {extra:?}, OpenCV did not (it found {theirs:?})", photo.file);
        photos += 1;
        compared += theirs.len();
    }
    assert!(photos > 50 && compared > 100, "too little compared: {photos} photos, {compared} boxes");
    eprintln!("{photos} photos, {compared} boxes: the same faces from both engines");
}

/// ONNX Runtime tells the two YuNet releases apart by their outputs (2023mar, which
/// OpenCV 4.6 cannot load, is the repository's default; `tests/eval.rs` measures it).
#[test]
fn onnxruntime_loads_both_yunet_releases() {
    let library = onnxruntime_library();
    for (file, release) in [("2022mar", Release::Mar2022), ("2023mar", Release::Mar2023)] {
        let model = shared_dir().join(format!("models/face_detection_yunet_{file}.onnx"));
        assert_eq!(OrtYunet::load(&model, Some(&library)).unwrap().release(), release, "{file}");
    }
}
