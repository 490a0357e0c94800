//! EXIF orientation: a labelled photo stored in each of the 8 orientations
//! (pixels transformed, tag set so that a viewer shows it upright) must give
//! the same upright face boxes and the same upright crop as the original.

use opencv::core::{self, Mat, Vector};
use opencv::imgcodecs;
use opencv::prelude::*;
use facepipe_core::topology::{CropParams, DetectParams, SecondPass};
use facepipe_vision::{crop, detect};
use crate::support::{iou, labelled_photos, shared_dir};

/// Stored pixels for orientation `tag`, given the upright image: the inverse of
/// the transform a viewer applies.
fn stored_for(upright: &Mat, tag: u16) -> Mat {
    let mut out = Mat::default();
    match tag {
        1 => out = upright.clone(),
        2 => core::flip(upright, &mut out, 1).unwrap(),
        3 => core::flip(upright, &mut out, -1).unwrap(),
        4 => core::flip(upright, &mut out, 0).unwrap(),
        5 => core::transpose(upright, &mut out).unwrap(),
        6 => core::rotate(upright, &mut out, core::ROTATE_90_COUNTERCLOCKWISE).unwrap(),
        7 => {
            let mut t = Mat::default();
            core::transpose(upright, &mut t).unwrap();
            core::flip(&t, &mut out, -1).unwrap();
        }
        8 => core::rotate(upright, &mut out, core::ROTATE_90_CLOCKWISE).unwrap(),
        _ => unreachable!(),
    }
    out
}

/// A JPEG of `image` with an EXIF APP1 segment carrying only the orientation tag.
fn jpeg_with_orientation(image: &Mat, tag: u16) -> Vec<u8> {
    let mut plain = Vector::<u8>::new();
    imgcodecs::imencode(".jpg", image, &mut plain, &Vector::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 95])).unwrap();
    let plain = plain.to_vec();
    // TIFF (little endian): header, one IFD entry (0x0112 Orientation, SHORT, 1), no next IFD.
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&tag.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]); // the rest after SOI
    out
}

/// YuNet 2022mar on OpenCV's engine, alone: orientation is this test's subject, and the
/// second pass needs ONNX Runtime.
fn params() -> DetectParams {
    DetectParams {
        model: Some(shared_dir().join("models/face_detection_yunet_2022mar.onnx")),
        second_pass: SecondPass::off(),
        ..DetectParams::default()
    }
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    let decode = |bytes: &[u8]| imgcodecs::imdecode(&Vector::<u8>::from_slice(bytes), imgcodecs::IMREAD_GRAYSCALE).unwrap();
    let (a, b) = (decode(a), decode(b));
    let mut diff = Mat::default();
    core::absdiff(&a, &b, &mut diff).unwrap();
    core::mean(&diff, &core::no_array()).unwrap()[0]
}

#[test]
fn every_exif_orientation_is_detected_and_cropped_upright() {
    let photo = labelled_photos().into_iter().find(|p| p.file == "dlib/2008_001322.jpg").unwrap();
    // Enlarged 4x (2000x1500) so both detect and crop take the DCT-reduced decode path.
    let labels: Vec<[f32; 4]> = photo.faces.unwrap().iter().map(|b| b.map(|v| v * 4.0)).collect();
    let small = imgcodecs::imread(&shared_dir().join("data/faces").join(&photo.file), imgcodecs::IMREAD_COLOR).unwrap();
    let mut upright = Mat::default();
    opencv::imgproc::resize(&small, &mut upright, core::Size::new(0, 0), 4.0, 4.0, opencv::imgproc::INTER_CUBIC).unwrap();
    assert_eq!(facepipe_vision::decode::reduction_for(facepipe_vision::decode::Header { width: 2000, height: 1500 }, 640), 2);
    let reference_bytes = jpeg_with_orientation(&upright, 1);
    let reference = detect::detect_faces(&reference_bytes, &params()).unwrap();
    let matched = labels.iter().filter(|l| reference.faces.iter().any(|f| iou([f.x, f.y, f.w, f.h], **l) >= 0.5)).count();
    assert!(matched >= 2, "the upright photo's faces are found: {:?}", reference.faces);
    let crop_params = CropParams::default();
    let chosen = crop::chosen_faces(&reference.faces, &crop_params);
    let reference_crop = crop::crop_faces(&reference_bytes, &reference.faces, &chosen, &crop_params, 100.0).unwrap().remove(0);

    for tag in 1..=8u16 {
        let bytes = jpeg_with_orientation(&stored_for(&upright, tag), tag);
        let found = detect::detect_faces(&bytes, &params()).unwrap();
        assert_eq!((found.width, found.height), (upright.cols() as u32, upright.rows() as u32), "orientation {tag}");
        assert_eq!(found.faces.len(), reference.faces.len(), "orientation {tag}: {:?}", found.faces);
        for want in &reference.faces {
            let want = [want.x, want.y, want.w, want.h];
            let best = found.faces.iter().map(|f| iou([f.x, f.y, f.w, f.h], want)).fold(0.0, f32::max);
            assert!(best >= 0.8, "orientation {tag}: upright box {want:?} found with IoU {best}: {:?}", found.faces);
        }
        let chosen = crop::chosen_faces(&found.faces, &crop_params);
        let crops = crop::crop_faces(&bytes, &found.faces, &chosen, &crop_params, 100.0).unwrap();
        let diff = mean_abs_diff(&crops[0], &reference_crop);
        assert!(diff < 12.0, "orientation {tag}: crop differs from the upright one by {diff:.1} grey levels");
    }
    // The check can fail: a crop of the same face turned on its side is far from upright.
    let sideways = jpeg_with_orientation(&stored_for(&upright, 6), 1);
    let found = detect::detect_faces(&sideways, &params()).unwrap();
    let chosen = crop::chosen_faces(&found.faces, &crop_params);
    if let Some(crop_bytes) = crop::crop_faces(&sideways, &found.faces, &chosen, &crop_params, 100.0).unwrap().first() {
        assert!(mean_abs_diff(crop_bytes, &reference_crop) >= 12.0, "a sideways crop must not pass as upright");
    }
}
