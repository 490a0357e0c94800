//! Large photos of many people (`stages.detect.params.min_face`): small faces on a
//! 12 MP photo are found in overlapping tiles at the scale `min_face` needs, once each,
//! also where a tile's edge cuts them, and travel through the real stages.

use std::time::Duration;

use opencv::core::{Mat, Rect, Scalar, Size, Vector, CV_8UC3};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::prelude::*;
use facepipe_core::domain::{BatchStatus, ImageStatus};
use facepipe_core::messages::FaceBox;
use facepipe_core::topology::{CropPolicy, DetectParams};
use facepipe_vision::{detect, tiles};
use crate::support::{iou, shared_dir, use_shared_models, write_zip, Deployment};

/// The astronaut's face (as the repository's detector finds it on the photo), with as
/// much around it again on each side, scaled so the face is `side` pixels: the patch
/// and the face's box in it.
fn face_patch(side: f64) -> (Mat, [f32; 4]) {
    let path = shared_dir().join("data/faces/skimage/astronaut.png");
    let photo = imgcodecs::imread(&path, imgcodecs::IMREAD_COLOR).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let face = detect::detect_faces(&bytes, &detector(None)).unwrap().faces[0];
    let (cx, cy, s) = (face.x + face.w / 2.0, face.y + face.h / 2.0, face.w.max(face.h));
    let around = Rect::new((cx - s) as i32, (cy - s) as i32, (2.0 * s) as i32, (2.0 * s) as i32);
    let source = Mat::roi(&photo, around).unwrap();
    let k = side / s as f64;
    let mut patch = Mat::default();
    imgproc::resize(&source, &mut patch, Size::new(0, 0), k, k, imgproc::INTER_AREA).unwrap();
    let (fx, fy) = ((cx - s / 2.0 - around.x as f32) * k as f32, (cy - s / 2.0 - around.y as f32) * k as f32);
    (patch, [fx, fy, face.w * k as f32, face.h * k as f32])
}

/// A grey 4000x3000 photo with the astronaut's face (of `side` px) centred at each of
/// `centres`, as a JPEG, and where each face lies.
fn sheet(side: f64, centres: &[(f64, f64)]) -> (Vec<u8>, Vec<[f32; 4]>) {
    let mut canvas = Mat::new_rows_cols_with_default(3000, 4000, CV_8UC3, Scalar::all(128.0)).unwrap();
    let (patch, face) = face_patch(side);
    let mut faces = Vec::new();
    for &(cx, cy) in centres {
        let (x, y) = ((cx as f32 - face[0] - face[2] / 2.0) as i32, (cy as f32 - face[1] - face[3] / 2.0) as i32);
        let mut target = Mat::roi_mut(&mut canvas, Rect::new(x, y, patch.cols(), patch.rows())).unwrap();
        patch.copy_to(&mut target).unwrap();
        faces.push([x as f32 + face[0], y as f32 + face[1], face[2], face[3]]);
    }
    let mut jpeg = Vector::<u8>::new();
    imgcodecs::imencode(".jpg", &canvas, &mut jpeg, &Vector::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 92])).unwrap();
    (jpeg.to_vec(), faces)
}

/// The repository's detector (YuNet, then RetinaFace around its doubtful boxes), with `min_face`.
fn detector(min_face: Option<u32>) -> DetectParams {
    let mut params = DetectParams { min_face, ..DetectParams::default() };
    use_shared_models(&mut params);
    params
}

/// How many of `found` match `face` (IoU >= 0.4).
fn matches(found: &[FaceBox], face: [f32; 4]) -> usize {
    found.iter().filter(|f| iou([f.x, f.y, f.w, f.h], face) >= 0.4).count()
}

#[test]
fn a_face_cut_by_a_tile_edge_is_found_once() {
    let plan = tiles::Plan::for_photo(4000, 3000, 640, true, 20).expect("a 12 MP photo with min_face 20 is tiled");
    // The first tile's right and bottom edges, in original pixels: inner edges.
    let right = (plan.xs[0] + plan.tile) as f64 / plan.scale;
    let bottom = (plan.ys[0] + plan.tile) as f64 / plan.scale;
    let centres = [(right, 400.0), (600.0, bottom), (right, bottom)];
    // 48 px faces: 8 px at the default width 640, which finds none of them.
    let (jpeg, faces) = sheet(48.0, &centres);
    let default = detect::detect_faces(&jpeg, &detector(None)).unwrap();
    assert!(faces.iter().all(|f| matches(&default.faces, *f) == 0), "the default finds them: {:?}", default.faces);
    let tiled = detect::detect_faces(&jpeg, &detector(Some(20))).unwrap();
    for (face, centre) in faces.iter().zip(centres) {
        assert_eq!(matches(&tiled.faces, *face), 1, "the face on the edge at {centre:?}, found once: {:?}", tiled.faces);
    }
    assert_eq!(tiled.faces.len(), faces.len(), "nothing else: {:?}", tiled.faces);
    assert!(tiled.faces.iter().all(|f| f.landmarks.is_some()), "landmarks on tiled boxes too");
}

/// Through the real stages: 12 MP photos of small faces (boxes 20 to 43 px on their
/// smaller side) with `min_face = 20` and `policy = "all"` get every face recorded and cropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_12_mp_photo_with_small_faces_gets_them_through_the_pipeline() {
    let d = Deployment::start(|t| {
        t.stages.detect.params.min_face = Some(20);
        t.stages.crop.params.policy = CropPolicy::All;
    })
    .await;
    // A grid of faces away from each other. `side` is the box's longer side: the
    // astronaut's face is about 0.72 as wide as tall, so 28 is a 20 px wide face.
    let mut entries = Vec::new();
    let mut expected = Vec::new();
    for (i, side) in [28.0, 36.0, 44.0, 60.0].into_iter().enumerate() {
        let centres: Vec<(f64, f64)> = (0..3).map(|j| (500.0 + 1000.0 * j as f64, 450.0 + 700.0 * i as f64)).collect();
        let (jpeg, faces) = sheet(side, &centres);
        entries.push((format!("sheet-{side}.jpg"), jpeg));
        expected.push(faces);
    }
    let zip = d.dir.path().join("sheets.zip");
    write_zip(&zip, &entries);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "large"]).trim().to_string();
    let status = d.wait_for_batch(&batch, Duration::from_secs(300)).await;
    assert_eq!((status.status, status.failed), (BatchStatus::Completed, 0), "{status:?}");
    let mut results = d.db().await.results(&batch).await.unwrap();
    results.sort_by_key(|r| r.image_id.clone());
    assert_eq!(results.len(), entries.len());
    for (r, faces) in results.iter().zip(&expected) {
        assert_eq!(r.status, ImageStatus::Cropped, "{r:?}");
        let found = r.faces.len();
        assert_eq!(found, faces.len(), "{}: {found} faces recorded, {} placed: {:?}", r.image_id, faces.len(), r.faces);
        for face in faces {
            assert_eq!(matches(&r.faces, *face), 1, "{}: {face:?} not recorded once: {:?}", r.image_id, r.faces);
        }
        assert_eq!(r.crop_keys.len(), faces.len(), "one crop per face with policy all");
    }
}

