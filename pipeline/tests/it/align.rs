//! Eye-aligned crops (`crop.align = "eyes"`): labelled single-face photos, turned
//! by known angles, must come out of crop with their eyes level; with alignment
//! off, crops must be exactly what they were without landmarks.
//!
//! Levelness is measured twice: against the known turn (the person's own tilt,
//! read on the photo as taken, plus the angle the test turned it by, against the
//! angle crop turned it back by), and the way a person would check it, by
//! detecting the face on the crop itself and reading its eye line.

use std::time::Duration;

use opencv::core::{self, Mat, Point2f, Scalar, Size, Vector};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::prelude::*;
use facepipe_core::messages::FaceBox;
use facepipe_core::topology::{CropAlign, CropParams, DetectParams};
use facepipe_runtime::store::Store;
use facepipe_vision::{crop, detect};
use crate::support::{labelled_photos, shared_dir, use_shared_models, write_zip, Deployment};
use facepipe_core::domain::{BatchStatus, ImageStatus};

/// Portraits known to hold exactly one face (face_recognition's examples and the astronaut).
fn portraits() -> Vec<(String, Mat)> {
    labelled_photos()
        .into_iter()
        .filter(|p| p.face_count_known == Some(1) && (p.file.starts_with("face_recognition/") || p.file.starts_with("skimage/")))
        .filter(|p| !p.file.contains("partial"))
        .map(|p| {
            let path = shared_dir().join("data/faces").join(&p.file);
            (p.file, imgcodecs::imread(&path, imgcodecs::IMREAD_COLOR).unwrap())
        })
        .collect()
}

/// `image` turned by `degrees` counter-clockwise on screen about its centre, on a
/// canvas large enough to keep every pixel (the corners filled grey), as a JPEG.
fn turned_jpeg(image: &Mat, degrees: f64) -> Vec<u8> {
    let (w, h) = (image.cols() as f64, image.rows() as f64);
    let (cos, sin) = (degrees.to_radians().cos().abs(), degrees.to_radians().sin().abs());
    let (cw, ch) = ((w * cos + h * sin).ceil(), (w * sin + h * cos).ceil());
    let mut m = imgproc::get_rotation_matrix_2d(Point2f::new(w as f32 / 2.0, h as f32 / 2.0), degrees, 1.0).unwrap();
    // Move the turned image to the middle of the larger canvas.
    *m.at_2d_mut::<f64>(0, 2).unwrap() += (cw - w) / 2.0;
    *m.at_2d_mut::<f64>(1, 2).unwrap() += (ch - h) / 2.0;
    let mut out = Mat::default();
    imgproc::warp_affine(&image, &mut out, &m, Size::new(cw as i32, ch as i32), imgproc::INTER_LINEAR, core::BORDER_CONSTANT, Scalar::all(128.0))
        .unwrap();
    encode(&out)
}

fn encode(image: &Mat) -> Vec<u8> {
    let mut jpeg = Vector::<u8>::new();
    imgcodecs::imencode(".jpg", image, &mut jpeg, &Vector::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 95])).unwrap();
    jpeg.to_vec()
}

/// The repository's detector: YuNet 2023mar on ONNX Runtime, then RetinaFace.
fn detector() -> DetectParams {
    let mut params = DetectParams::default();
    use_shared_models(&mut params);
    params
}

fn aligning() -> CropParams {
    CropParams { align: CropAlign::Eyes, ..CropParams::default() }
}

/// The largest face in `jpeg`, by the repository's detector, with landmarks as detect
/// gives them to a crop stage that aligns.
fn largest_face(jpeg: &[u8], params: &DetectParams) -> Option<FaceBox> {
    let found = detect::detect_faces_for(jpeg, params, Some(&aligning())).unwrap();
    found.faces.into_iter().max_by(|a, b| a.area().total_cmp(&b.area()))
}

/// The angle of the eye line read on a crop (degrees; 0 is level), if the face is found on it.
fn eye_angle_of_crop(crop_jpeg: &[u8]) -> Option<f64> {
    largest_face(crop_jpeg, &detector()).and_then(|f| f.landmarks).map(|l| l.eye_angle())
}

fn crop_largest(jpeg: &[u8], face: FaceBox, align: CropAlign) -> Vec<u8> {
    let params = CropParams { align, ..CropParams::default() };
    crop::crop_faces(jpeg, &[face], &[0], &params, 100.0).unwrap().remove(0)
}

#[test]
fn eye_aligned_crops_of_turned_portraits_are_level() {
    let photos = portraits();
    assert!(photos.len() >= 10, "portraits: {}", photos.len());
    let params = detector();
    let (mut checked, mut worst, mut read_on_crops) = (0, 0.0f64, Vec::new());
    for (file, image) in &photos {
        // The person's own tilt, as the photo was taken.
        let tilt = largest_face(&encode(image), &params).and_then(|f| f.landmarks).expect("landmarks").eye_angle();
        for degrees in [-30.0, -15.0, 10.0, 25.0] {
            let jpeg = turned_jpeg(image, degrees);
            let face = largest_face(&jpeg, &params).unwrap_or_else(|| panic!("{file} turned {degrees}: no face found"));
            let landmarks = face.landmarks.unwrap_or_else(|| panic!("{file}: the detector gave no landmarks"));
            // The photo was turned counter-clockwise on screen, so its eye line now runs at
            // tilt - degrees; crop turns it back by the angle it reads.
            let left = (tilt - degrees) - landmarks.eye_angle();
            let aligned = crop_largest(&jpeg, face, CropAlign::Eyes);
            let size = imagesize::blob_size(&aligned).unwrap();
            assert_eq!((size.width, size.height), (300, 300), "{file}: still a square of the output size");
            let angle = eye_angle_of_crop(&aligned).unwrap_or_else(|| panic!("{file} turned {degrees}: no face on the aligned crop"));
            eprintln!("{file} (tilt {tilt:.1}) turned {degrees}: {left:.1} degrees left by the known turn, {angle:.1} read on the crop");
            assert!(left.abs() <= 3.0, "{file} (tilt {tilt:.1}) turned {degrees}: the crop is left {left:.1} degrees off level");
            // Reading landmarks again on a 300 px crop filled by the face is noisier (seen: up
            // to 3.8 degrees on crops that look level), so that check is looser, and on the median.
            assert!(angle.abs() <= 5.0, "{file} turned {degrees}: the aligned crop's eye line reads {angle:.1} degrees");
            worst = worst.max(left.abs());
            read_on_crops.push(angle.abs());
            // The measure can fail: the same face cropped upright keeps the turn.
            if degrees.abs() >= 25.0 {
                let upright = crop_largest(&jpeg, face, CropAlign::None);
                let angle = eye_angle_of_crop(&upright).unwrap_or_else(|| panic!("{file} turned {degrees}: no face on the upright crop"));
                assert!(angle.abs() > 10.0, "{file} turned {degrees}: an upright crop read as level ({angle:.1})");
            }
            checked += 1;
        }
    }
    read_on_crops.sort_by(f64::total_cmp);
    let median = read_on_crops[read_on_crops.len() / 2];
    eprintln!("{checked} turned portraits: every aligned crop level within {worst:.2} degrees; read on the crops, median {median:.2}");
    assert!(median <= 2.0, "read on the crops, the median eye line is {median:.2} degrees off level");
}

/// A face at a turned window near the border stays inside the image, and only the
/// window's bounding box is decoded (the crop is the same as from a whole decode).
#[test]
fn turned_windows_stay_inside_the_image() {
    for degrees in [0.0, 20.0, -45.0, 90.0, 180.0] {
        for (x, y) in [(0.0, 0.0), (1500.0, 1100.0), (700.0, 500.0)] {
            let face = FaceBox::new(x, y, 100.0, 100.0, 0.9);
            let t = crop::turned_window(&face, degrees, 1600, 1200, 0.2);
            let b = t.bounds();
            assert!(b.x0 >= -1e-9 && b.y0 >= -1e-9 && b.x1 <= 1600.0 + 1e-9 && b.y1 <= 1200.0 + 1e-9, "{degrees} at ({x}, {y}): {b:?}");
            assert!((t.side - 140.0).abs() < 1e-9, "same padding rule as upright: {t:?}");
        }
    }
    // Larger than the image once turned: shrunk until its bounding box fits.
    let t = crop::turned_window(&FaceBox::new(0.0, 0.0, 500.0, 500.0, 0.9), 45.0, 800, 600, 0.2);
    assert!((t.bounds().x1 - t.bounds().x0 - 600.0).abs() < 1e-6, "{t:?}");
}

#[test]
fn with_alignment_off_crops_are_unchanged_byte_for_byte() {
    let params = detector();
    let mut compared = 0;
    for (file, image) in portraits().iter().step_by(3) {
        for jpeg in [encode(image), turned_jpeg(image, 20.0)] {
            let found = detect::detect_faces(&jpeg, &params).unwrap();
            assert!(found.faces.iter().all(|f| f.landmarks.is_some()), "{file}: YuNet and RetinaFace give landmarks");
            let bare: Vec<FaceBox> = found.faces.iter().map(|f| FaceBox { landmarks: None, ..*f }).collect();
            let off = CropParams { policy: facepipe_core::topology::CropPolicy::All, ..CropParams::default() };
            let chosen = crop::chosen_faces(&found.faces, &off);
            let with = crop::crop_faces(&jpeg, &found.faces, &chosen, &off, 100.0).unwrap();
            let without = crop::crop_faces(&jpeg, &bare, &chosen, &off, 100.0).unwrap();
            assert_eq!(with, without, "{file}: landmarks change nothing with alignment off");
            // A box without landmarks (the Haar cascade's) is cropped upright even with alignment on.
            let eyes = CropParams { align: CropAlign::Eyes, ..off.clone() };
            assert_eq!(crop::crop_faces(&jpeg, &bare, &chosen, &eyes, 100.0).unwrap(), without, "{file}");
            // And alignment does change a turned face's crop.
            assert_ne!(crop::crop_faces(&jpeg, &found.faces, &chosen, &eyes, 100.0).unwrap(), without, "{file}");
            compared += 1;
        }
    }
    assert!(compared >= 6, "compared {compared}");
}

/// Through the real stages: landmarks travel in `faces.crop` and are recorded, and
/// with `align = "eyes"` the crops in the object store are level.
#[tokio::test(flavor = "multi_thread")]
async fn the_crop_stage_levels_the_eyes_when_the_topology_says_so() {
    let d = Deployment::start(|t| t.stages.crop.params.align = CropAlign::Eyes).await;
    let entries: Vec<(String, Vec<u8>)> = portraits()
        .iter()
        .step_by(2)
        .enumerate()
        .map(|(i, (file, image))| (format!("{i:02}-{}.jpg", file.replace('/', "_")), turned_jpeg(image, if i % 2 == 0 { 20.0 } else { -20.0 })))
        .collect();
    let zip = d.dir.path().join("turned.zip");
    write_zip(&zip, &entries);
    let batch = d.cli_ok(&["submit", zip.to_str().unwrap(), "--project", "align"]).trim().to_string();
    let status = d.wait_for_batch(&batch, Duration::from_secs(180)).await;
    assert_eq!((status.status, status.failed), (BatchStatus::Completed, 0), "{status:?}");
    let results = d.db().await.results(&batch).await.unwrap();
    assert_eq!(results.len(), entries.len());
    let store = Store::open(&d.topology.object_store).unwrap();
    for r in &results {
        assert_eq!(r.status, ImageStatus::Cropped, "{r:?}");
        assert!(r.faces.iter().all(|f| f.landmarks.is_some()), "landmarks are recorded: {r:?}");
        let crop = store.get(&r.crop_keys[0]).await.unwrap();
        let angle = eye_angle_of_crop(&crop).unwrap_or_else(|| panic!("{}: no face on the crop", r.crop_keys[0]));
        // Read again on the crop, which is noisier than the turn itself (see above).
        assert!(angle.abs() <= 5.0, "{}: eye line at {angle:.1} degrees", r.crop_keys[0]);
    }
}
