//! Cropping: which faces, which window around each, and the encoded crop.
//!
//! The window is a square (so resizing to the square output never distorts)
//! centred on the face, whose side is the face's larger side plus `padding` of
//! it on each side. At an image border the window is shifted back inside the
//! image, keeping the face as central as possible; only when the image is
//! smaller than the window is the window shrunk to fit.
//!
//! With `align = "eyes"`, the same square is turned about its centre by the
//! angle of the face's eye line ([`TurnedWindow`]), and the placement rule
//! applies to the turned square's upright bounding box.

use opencv::core::{Mat, Size, Vector};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::prelude::*;

use super::decode;
use super::region::{self, Area, Patch};
use super::VisionError;
use facepipe_core::messages::FaceBox;
use facepipe_core::telemetry::Step;
use facepipe_core::topology::{CropAlign, CropParams, CropPolicy};

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

/// A crop window turned about its centre, in full-resolution pixels: a square
/// of `side` centred on (`cx`, `cy`) whose top edge runs at `angle` degrees,
/// clockwise on screen, from the horizontal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnedWindow {
    /// Centre, horizontally.
    pub cx: f64,
    /// Centre, vertically.
    pub cy: f64,
    /// Side length.
    pub side: f64,
    /// Turn in degrees, clockwise on screen.
    pub angle: f64,
}

impl TurnedWindow {
    /// The upright bounding box of the turned square: what must be decoded.
    pub fn bounds(&self) -> Area {
        let half = self.side * spread(self.angle) / 2.0;
        Area { x0: self.cx - half, y0: self.cy - half, x1: self.cx + half, y1: self.cy + half }
    }

    /// For the window sampled upright as `n` x `n` pixels: where the centre of
    /// sample (u, v) lies, in the window's own coordinates, as `[[a, b, c], [d, e, f]]`
    /// with x = a u + b v + c and y = d u + e v + f. Sample u runs along the
    /// turned top edge, v down the turned side.
    pub fn affine(&self, n: f64) -> [[f64; 3]; 2] {
        let (sin, cos) = self.angle.to_radians().sin_cos();
        let step = self.side / n;
        let first = (0.5 - n / 2.0) * step; // offset of sample 0's centre from the window's
        [
            [step * cos, -step * sin, self.cx + first * cos - first * sin],
            [step * sin, step * cos, self.cy + first * sin + first * cos],
        ]
    }
}

/// `image` sampled into a `side` x `side` square through `affine` (from sample
/// indices to coordinates in `image`, as [`TurnedWindow::affine`] gives them),
/// bilinearly, with `border` beyond the image's edges.
pub(crate) fn warp(image: &Mat, affine: &[[f64; 3]; 2], side: i32, border: i32) -> Result<Mat, VisionError> {
    let [[a, b, c], [d, e, f]] = *affine;
    // OpenCV addresses pixels by index, whose centre is at +0.5.
    let m = Mat::from_slice_2d(&[[a, b, c - 0.5], [d, e, f - 0.5]])?;
    let mut out = Mat::default();
    imgproc::warp_affine(
        image,
        &mut out,
        &m,
        Size::new(side, side),
        imgproc::INTER_LINEAR | imgproc::WARP_INVERSE_MAP,
        border,
        opencv::core::Scalar::default(),
    )?;
    Ok(out)
}

/// How much wider than the square its upright bounding box is, turned by `angle` degrees.
fn spread(angle: f64) -> f64 {
    let r = angle.to_radians();
    r.cos().abs() + r.sin().abs()
}

/// The crop window for `face` turned by `angle` degrees (its eye line) in an
/// image of `width` x `height`: the side [`window`] gives, shrunk only when its
/// bounding box would be larger than the image, and the centre shifted so that
/// the bounding box stays inside it.
pub fn turned_window(face: &FaceBox, angle: f64, width: u32, height: u32, padding: f64) -> TurnedWindow {
    let wanted = (face.w.max(face.h) as f64 * (1.0 + 2.0 * padding)).round().max(1.0);
    let k = spread(angle);
    let side = wanted.min(width.min(height) as f64 / k).max(1.0);
    let half = side * k / 2.0;
    let place = |centre: f64, limit: u32| centre.clamp(half.min(limit as f64 / 2.0), (limit as f64 - half).max(limit as f64 / 2.0));
    TurnedWindow {
        cx: place(face.x as f64 + face.w as f64 / 2.0, width),
        cy: place(face.y as f64 + face.h as f64 / 2.0, height),
        side,
        angle,
    }
}

/// Where one face's crop comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Placement {
    /// A window along the image's axes.
    Upright(Area),
    /// A window turned to level the eyes.
    Turned(TurnedWindow),
}

impl Placement {
    /// Side of the square, in full-resolution pixels.
    fn side(&self) -> f64 {
        match self {
            Placement::Upright(area) => area.x1 - area.x0,
            Placement::Turned(turned) => turned.side,
        }
    }

    /// What must be decoded for it.
    fn bounds(&self) -> Area {
        match self {
            Placement::Upright(area) => *area,
            Placement::Turned(turned) => turned.bounds(),
        }
    }
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
    let placements: Vec<Placement> = chosen
        .iter()
        .map(|&i| {
            let face = &faces[i];
            match (params.align, face.landmarks) {
                (CropAlign::Eyes, Some(landmarks)) => {
                    Placement::Turned(turned_window(face, landmarks.eye_angle(), width, height, params.padding))
                }
                _ => {
                    let w = window(face, width, height, params.padding);
                    let (x, y, side) = (w.x as f64, w.y as f64, w.side as f64);
                    Placement::Upright(Area { x0: x, y0: y, x1: x + side, y1: y + side })
                }
            }
        })
        .collect();
    let smallest_side = placements.iter().map(Placement::side).fold(f64::MAX, f64::min);
    let areas: Vec<Area> = placements.iter().map(Placement::bounds).collect();
    let patch = decode_patch(bytes, header, orientation, &areas, smallest_side, params.output_size)?;

    let out_size = Size::new(params.output_size as i32, params.output_size as i32);
    let encode_params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, params.jpeg_quality]);
    // Every chosen face's resize and JPEG encoding, as one step per image.
    let _timer = Step::Encode.start();
    placements
        .iter()
        .map(|placement| match placement {
            Placement::Upright(area) => {
                let rect = patch.pixels_of(*area);
                encode_square(&Mat::roi(&patch.image, rect)?, rect.width, out_size, &encode_params)
            }
            Placement::Turned(turned) => {
                let square = turn(&patch, turned)?;
                encode_square(&square, square.cols(), out_size, &encode_params)
            }
        })
        .collect()
}

/// `square` (`width` pixels wide) resized to `out_size` and encoded as JPEG.
fn encode_square(
    square: &impl opencv::core::ToInputArray,
    width: i32,
    out_size: Size,
    encode_params: &Vector<i32>,
) -> Result<Vec<u8>, VisionError> {
    // Area averaging to shrink; cubic to enlarge.
    let interpolation = if width >= out_size.width { imgproc::INTER_AREA } else { imgproc::INTER_CUBIC };
    let mut resized = Mat::default();
    imgproc::resize(square, &mut resized, out_size, 0.0, 0.0, interpolation)?;
    let mut jpeg = Vector::<u8>::new();
    imgcodecs::imencode(".jpg", &resized, &mut jpeg, encode_params)?;
    Ok(jpeg.to_vec())
}

/// The pixels of `turned`, turned upright, at the patch's scale: a square as
/// many patch pixels wide as the window is. Its size is then the same as an
/// upright window's, so the same resize rule follows.
fn turn(patch: &Patch, turned: &TurnedWindow) -> Result<Mat, VisionError> {
    let n = (turned.side * patch.per_full_x).round().max(1.0);
    let [[a, b, c], [d, e, f]] = turned.affine(n);
    let (fx, fy) = (patch.per_full_x, patch.per_full_y);
    // From full-resolution pixels to the patch's.
    let on_patch = [[a * fx, b * fx, c * fx - patch.x], [d * fy, e * fy, f * fy - patch.y]];
    // Replicated edges: the window lies inside the image, so only rounding reaches past the patch.
    warp(&patch.image, &on_patch, n as i32, opencv::core::BORDER_REPLICATE)
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
    use facepipe_core::messages::Landmarks;

    fn face(x: f32, y: f32, w: f32, h: f32) -> FaceBox {
        FaceBox::new(x, y, w, h, 0.9)
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

    /// Centroids of the dark pixels in the left and right halves of a grey image.
    fn dark_spots(image: &Mat) -> [(f64, f64); 2] {
        let mut sums = [(0.0, 0.0, 0.0); 2];
        for y in 0..image.rows() {
            for x in 0..image.cols() {
                if *image.at_2d::<u8>(y, x).unwrap() < 60 {
                    let half = usize::from(x >= image.cols() / 2);
                    sums[half].0 += x as f64 + 0.5;
                    sums[half].1 += y as f64 + 0.5;
                    sums[half].2 += 1.0;
                }
            }
        }
        sums.map(|(sx, sy, n)| (sx / n, sy / n))
    }

    #[test]
    fn a_turned_crop_levels_two_marked_eyes() {
        // Two dark discs ("eyes") on a light 1600x1200 photo, their line at 26.6 degrees.
        let mut img = Mat::new_rows_cols_with_default(1200, 1600, opencv::core::CV_8UC3, opencv::core::Scalar::all(220.0)).unwrap();
        let eyes = [[700.0f32, 500.0], [820.0, 560.0]];
        for [x, y] in eyes {
            let centre = opencv::core::Point::new(x as i32, y as i32);
            imgproc::circle(&mut img, centre, 12, opencv::core::Scalar::all(0.0), -1, imgproc::LINE_AA, 0).unwrap();
        }
        let mut jpeg = Vector::<u8>::new();
        imgcodecs::imencode(".jpg", &img, &mut jpeg, &Vector::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 95])).unwrap();
        let landmarks = Landmarks([eyes[0], eyes[1], [760.0, 600.0], [720.0, 650.0], [800.0, 660.0]]);
        let face = FaceBox { landmarks: Some(landmarks), ..face(660.0, 440.0, 200.0, 260.0) };
        let params = CropParams { align: CropAlign::Eyes, ..CropParams::default() };
        let crop = crop_faces(jpeg.as_slice(), &[face], &[0], &params, 100.0).unwrap().remove(0);
        let out = imgcodecs::imdecode(&Vector::<u8>::from_slice(&crop), imgcodecs::IMREAD_GRAYSCALE).unwrap();
        assert_eq!((out.cols(), out.rows()), (300, 300));
        let [(x0, y0), (x1, y1)] = dark_spots(&out);
        let angle = (y1 - y0).atan2(x1 - x0).to_degrees();
        assert!(angle.abs() < 0.5, "eyes at ({x0:.1}, {y0:.1}) and ({x1:.1}, {y1:.1}): {angle:.2} degrees");
        // Their distance is kept at the output's scale: 134.2 px in a 364 px window, so 110.6 of 300.
        let distance = (x1 - x0).hypot(y1 - y0);
        assert!((distance - 134.16 * 300.0 / 364.0).abs() < 1.5, "eye distance {distance:.1}");
        // The window turns about the box's centre (760, 570), which lands in the middle.
        let (mx, my) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        let expect = |dx: f64, dy: f64| {
            let (s, c) = (-landmarks.eye_angle()).to_radians().sin_cos();
            (150.0 + (dx * c - dy * s) * 300.0 / 364.0, 150.0 + (dx * s + dy * c) * 300.0 / 364.0)
        };
        let (ex, ey) = expect(760.0 - 760.0, 530.0 - 570.0);
        assert!((mx - ex).abs() < 1.5 && (my - ey).abs() < 1.5, "midpoint ({mx:.1}, {my:.1}), expected ({ex:.1}, {ey:.1})");
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
