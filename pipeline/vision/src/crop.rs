//! Cropping: which faces, which window around each, and the encoded crop.
//!
//! The window is a square (so resizing to the square output never distorts)
//! centred on the face, whose side is the face's larger side plus `padding` of
//! it on each side. At an image border the window is shifted back inside the
//! image, keeping the face as central as possible; only when the image is
//! smaller than the window is the window shrunk to fit.

use opencv::core::{Mat, Size, Vector};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::prelude::*;

use super::decode;
use super::region::{self, Area, Patch};
use super::VisionError;
use facepipe_core::messages::FaceBox;
use facepipe_core::telemetry::Step;
use facepipe_core::topology::{CropParams, CropPolicy};

/// A square window in full-resolution pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Side length.
    pub side: u32,
}

/// The crop window for `face` in an image of `width` x `height`.
pub fn window(face: &FaceBox, width: u32, height: u32, padding: f64) -> Window {
    let cx = face.x as f64 + face.w as f64 / 2.0;
    let cy = face.y as f64 + face.h as f64 / 2.0;
    let wanted = (face.w.max(face.h) as f64 * (1.0 + 2.0 * padding)).round().max(1.0);
    let side = (wanted as u32).min(width).min(height).max(1);
    let place = |centre: f64, limit: u32| -> u32 {
        let start = (centre - side as f64 / 2.0).round();
        start.clamp(0.0, (limit - side) as f64) as u32
    };
    Window { x: place(cx, width), y: place(cy, height), side }
}

/// Indices of the faces to crop, in the order their crops are numbered: those
/// whose smaller side is at least `params.min_face_size`, then all of them or the largest.
pub fn chosen_faces(faces: &[FaceBox], params: &CropParams) -> Vec<usize> {
    let big_enough = faces
        .iter()
        .enumerate()
        .filter(|(_, f)| f.w.min(f.h) >= params.min_face_size as f32);
    match params.policy {
        CropPolicy::All => big_enough.map(|(i, _)| i).collect(),
        CropPolicy::Largest => big_enough
            .max_by(|a, b| a.1.area().total_cmp(&b.1.area()))
            .map(|(i, _)| vec![i])
            .unwrap_or_default(),
    }
}

/// Crops the chosen faces of an image and encodes each as a JPEG of
/// `output_size` squared.
///
/// A JPEG is decoded only where the crops are (the rectangle holding every
/// chosen window), at the smallest M/8 scale that still leaves every window at
/// least `output_size` pixels wide. Other formats, and JPEGs libjpeg cannot
/// give as BGR (CMYK), are decoded whole by OpenCV at a DCT reduction.
pub fn crop_faces(
    bytes: &[u8],
    faces: &[FaceBox],
    chosen: &[usize],
    params: &CropParams,
    max_megapixels: f64,
) -> Result<Vec<Vec<u8>>, VisionError> {
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    let header = decode::probe(bytes, max_megapixels)?;
    let orientation = if region::is_jpeg(bytes) { region::orientation(bytes) } else { 1 };
    let (width, height) =
        if region::swaps_axes(orientation) { (header.height, header.width) } else { (header.width, header.height) };
    let windows: Vec<Area> = chosen
        .iter()
        .map(|&i| {
            let w = window(&faces[i], width, height, params.padding);
            let (x, y, side) = (w.x as f64, w.y as f64, w.side as f64);
            Area { x0: x, y0: y, x1: x + side, y1: y + side }
        })
        .collect();
    let smallest_side = windows.iter().map(|a| a.x1 - a.x0).fold(f64::MAX, f64::min);
    let patch = decode_patch(bytes, header, orientation, &windows, smallest_side, params.output_size)?;

    let out_size = Size::new(params.output_size as i32, params.output_size as i32);
    let encode_params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, params.jpeg_quality]);
    // Every chosen face's resize and JPEG encoding, as one step per image.
    let _timer = Step::Encode.start();
    windows
        .iter()
        .map(|&area| {
            let roi = Mat::roi(&patch.image, patch.pixels_of(area))?;
            let interpolation = if roi.cols() >= out_size.width { imgproc::INTER_AREA } else { imgproc::INTER_CUBIC };
            let mut resized = Mat::default();
            imgproc::resize(&roi, &mut resized, out_size, 0.0, 0.0, interpolation)?;
            let mut jpeg = Vector::<u8>::new();
            imgcodecs::imencode(".jpg", &resized, &mut jpeg, &encode_params)?;
            Ok(jpeg.to_vec())
        })
        .collect()
}

/// The upright pixels under `windows`, at the smallest scale that keeps
/// `smallest_side` (full-resolution pixels) at least `output_size` wide.
fn decode_patch(
    bytes: &[u8],
    header: decode::Header,
    orientation: u8,
    windows: &[Area],
    smallest_side: f64,
    output_size: u32,
) -> Result<Patch, VisionError> {
    if region::is_jpeg(bytes) {
        // M/8 with M from 1 to 8: the first scale at which the smallest window still fills the output.
        let scale_num = (1..=8u32).find(|m| smallest_side * *m as f64 / 8.0 >= output_size as f64).unwrap_or(8);
        let area = windows.iter().copied().reduce(Area::union).expect("at least one window");
        let _timer = Step::Decode.start();
        if let Some(patch) = region::decode_area(bytes, header, orientation, scale_num, area)? {
            return Ok(patch);
        }
    }
    let ratio = (smallest_side / output_size as f64).max(1.0);
    let reduction = [8u32, 4, 2].into_iter().find(|r| (*r as f64) <= ratio).unwrap_or(1);
    let decoded = decode::decode(bytes, header, reduction)?;
    let (sx, sy) = decoded.scale();
    Ok(Patch { image: decoded.image, x: 0.0, y: 0.0, per_full_x: 1.0 / sx, per_full_y: 1.0 / sy })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, y: f32, w: f32, h: f32) -> FaceBox {
        FaceBox { x, y, w, h, score: 0.9 }
    }

    #[test]
    fn padded_square_centred_on_the_face() {
        let w = window(&face(400.0, 300.0, 100.0, 120.0), 1600, 1200, 0.2);
        assert_eq!(w.side, 168); // 120 * 1.4
        assert_eq!((w.x, w.y), (366, 276)); // centre (450, 360)
    }

    #[test]
    fn shifted_inside_at_borders_not_shrunk() {
        let w = window(&face(0.0, 0.0, 100.0, 100.0), 1600, 1200, 0.2);
        assert_eq!(w, Window { x: 0, y: 0, side: 140 });
        let w = window(&face(1550.0, 1150.0, 50.0, 50.0), 1600, 1200, 0.2);
        assert_eq!(w, Window { x: 1530, y: 1130, side: 70 });
    }

    #[test]
    fn huge_face_shrinks_to_the_image() {
        let w = window(&face(0.0, 0.0, 1000.0, 1000.0), 800, 600, 0.2);
        assert_eq!(w, Window { x: 200, y: 0, side: 600 }); // centred on the face, inside the image
        let w = window(&face(100.0, 0.0, 600.0, 600.0), 800, 600, 0.2);
        assert_eq!(w.side, 600);
        assert!(w.x + w.side <= 800);
    }

    #[test]
    fn tiny_face_and_tiny_image() {
        let w = window(&face(5.0, 5.0, 0.5, 0.5), 10, 10, 0.2);
        assert_eq!(w.side, 1);
        let w = window(&face(0.0, 0.0, 3.0, 3.0), 2, 2, 0.2);
        assert_eq!(w, Window { x: 0, y: 0, side: 2 });
    }

    #[test]
    fn policy_picks_largest_or_all() {
        let faces = [face(0.0, 0.0, 10.0, 10.0), face(0.0, 0.0, 30.0, 30.0), face(0.0, 0.0, 20.0, 20.0)];
        let largest = CropParams::default();
        let all = CropParams { policy: CropPolicy::All, ..CropParams::default() };
        assert_eq!(chosen_faces(&faces, &largest), vec![1]);
        assert_eq!(chosen_faces(&faces, &all), vec![0, 1, 2]);
        assert!(chosen_faces(&[], &largest).is_empty());
        // A minimum size drops small faces under either policy.
        let min = |policy| CropParams { policy, min_face_size: 15, ..CropParams::default() };
        assert_eq!(chosen_faces(&faces, &min(CropPolicy::All)), vec![1, 2]);
        assert_eq!(chosen_faces(&faces, &min(CropPolicy::Largest)), vec![1]);
        let huge = CropParams { min_face_size: 100, ..CropParams::default() };
        assert!(chosen_faces(&faces, &huge).is_empty(), "no face big enough: no crop");
    }

    #[test]
    fn crops_are_square_jpegs_of_the_output_size() {
        // A synthetic 800x600 image, encoded as JPEG by OpenCV itself.
        let img = Mat::new_rows_cols_with_default(600, 800, opencv::core::CV_8UC3, opencv::core::Scalar::all(128.0)).unwrap();
        let mut jpeg = Vector::<u8>::new();
        imgcodecs::imencode(".jpg", &img, &mut jpeg, &Vector::new()).unwrap();
        let faces = [face(700.0, 500.0, 120.0, 120.0), face(10.0, 10.0, 40.0, 40.0)];
        let params = CropParams { policy: CropPolicy::All, ..CropParams::default() };
        let crops = crop_faces(jpeg.as_slice(), &faces, &[0, 1], &params, 100.0).unwrap();
        assert_eq!(crops.len(), 2);
        for crop in crops {
            let decoded = imgcodecs::imdecode(&Vector::<u8>::from_slice(&crop), imgcodecs::IMREAD_COLOR).unwrap();
            assert_eq!((decoded.cols(), decoded.rows()), (300, 300));
        }
    }
}
