//! Decoding only the part of a JPEG that a crop needs, upright.
//!
//! `cv::imdecode` decodes every pixel of a photo; a face crop needs a window
//! that is often a tenth of it. The `jpeg-region` crate's C shim asks the
//! system's libjpeg-turbo to decode one rectangle at a scale of M/8 (any M in
//! 1..=8, finer than OpenCV's 1, 1/2, 1/4, 1/8), skipping the inverse DCT and
//! colour conversion outside it and stopping after its last row.
//!
//! libjpeg knows nothing of EXIF orientation, so the rectangle wanted in the
//! upright photo is mapped back into the stored one, decoded, and the patch is
//! then flipped and transposed exactly as OpenCV's decoder turns a whole image.

use opencv::core::{self, Mat};
use opencv::prelude::*;

use super::decode::Header;
use super::VisionError;

/// A rectangle `[x0, x1) x [y0, y1)` in (possibly fractional) pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Area {
    /// Left edge.
    pub x0: f64,
    /// Top edge.
    pub y0: f64,
    /// Right edge (exclusive).
    pub x1: f64,
    /// Bottom edge (exclusive).
    pub y1: f64,
}

impl Area {
    /// The smallest area holding both.
    pub fn union(self, other: Area) -> Area {
        Area { x0: self.x0.min(other.x0), y0: self.y0.min(other.y0), x1: self.x1.max(other.x1), y1: self.y1.max(other.y1) }
    }
}

/// The EXIF orientation (1-8) of a JPEG; 1 when it has none or it cannot be read.
pub fn orientation(bytes: &[u8]) -> u8 {
    exif::Reader::new()
        .read_from_container(&mut std::io::Cursor::new(bytes))
        .ok()
        .and_then(|e| e.get_field(exif::Tag::Orientation, exif::In::PRIMARY).and_then(|f| f.value.get_uint(0)))
        .filter(|o| (1..=8).contains(o))
        .unwrap_or(1) as u8
}

/// Whether the orientation swaps width and height.
pub fn swaps_axes(orientation: u8) -> bool {
    orientation >= 5
}

/// Where `area` of a stored image of `width` x `height` lands once the image
/// is turned upright for `orientation` (OpenCV's flips and transposes).
pub fn stored_to_upright(area: Area, width: f64, height: f64, orientation: u8) -> Area {
    let Area { x0, y0, x1, y1 } = area;
    let (w, h) = (width, height);
    let a = |x0, y0, x1, y1| Area { x0, y0, x1, y1 };
    match orientation {
        2 => a(w - x1, y0, w - x0, y1),
        3 => a(w - x1, h - y1, w - x0, h - y0),
        4 => a(x0, h - y1, x1, h - y0),
        5 => a(y0, x0, y1, x1),
        6 => a(h - y1, x0, h - y0, x1),
        7 => a(h - y1, w - x1, h - y0, w - x0),
        8 => a(y0, w - x1, y1, w - x0),
        _ => area,
    }
}

/// Where `area` of the upright image (`width` x `height`, upright) lies in the stored image.
pub fn upright_to_stored(area: Area, width: f64, height: f64, orientation: u8) -> Area {
    // Every orientation is its own inverse except the two quarter turns.
    let inverse = match orientation {
        6 => 8,
        8 => 6,
        o => o,
    };
    stored_to_upright(area, width, height, inverse)
}

/// Turns stored pixels upright for `orientation`, as OpenCV's decoder does.
pub fn orient(image: Mat, orientation: u8) -> Result<Mat, VisionError> {
    let flip = |src: &Mat, code| -> Result<Mat, VisionError> {
        let mut out = Mat::default();
        core::flip(src, &mut out, code)?;
        Ok(out)
    };
    let transposed = |src: &Mat| -> Result<Mat, VisionError> {
        let mut out = Mat::default();
        core::transpose(src, &mut out)?;
        Ok(out)
    };
    Ok(match orientation {
        2 => flip(&image, 1)?,
        3 => flip(&image, -1)?,
        4 => flip(&image, 0)?,
        5 => transposed(&image)?,
        6 => flip(&transposed(&image)?, 1)?,
        7 => flip(&transposed(&image)?, -1)?,
        8 => flip(&transposed(&image)?, 0)?,
        _ => image,
    })
}

/// An upright patch of a photo decoded at some scale, and where it sits.
pub struct Patch {
    /// 8-bit BGR pixels, upright.
    pub image: Mat,
    /// Left edge of the patch in upright pixels of the scaled image.
    pub x: f64,
    /// Top edge of the patch in upright pixels of the scaled image.
    pub y: f64,
    /// Scaled pixels per full-resolution pixel, horizontally.
    pub per_full_x: f64,
    /// Scaled pixels per full-resolution pixel, vertically.
    pub per_full_y: f64,
}

impl Patch {
    /// `area` (upright full-resolution pixels) as whole pixels of this patch, clamped inside it.
    pub fn pixels_of(&self, area: Area) -> core::Rect {
        let (pw, ph) = (self.image.cols(), self.image.rows());
        let x = ((area.x0 * self.per_full_x - self.x).round() as i32).clamp(0, pw - 1);
        let y = ((area.y0 * self.per_full_y - self.y).round() as i32).clamp(0, ph - 1);
        let x1 = ((area.x1 * self.per_full_x - self.x).round() as i32).clamp(x + 1, pw);
        let y1 = ((area.y1 * self.per_full_y - self.y).round() as i32).clamp(y + 1, ph);
        core::Rect::new(x, y, x1 - x, y1 - y)
    }
}

/// Whether the bytes start like a JPEG.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes `area` (upright full-resolution pixels) of a JPEG at `scale_num`/8,
/// upright. `None` when libjpeg cannot give BGR for this file (CMYK), so the
/// caller decodes it whole with OpenCV instead.
pub fn decode_area(bytes: &[u8], header: Header, orientation: u8, scale_num: u32, area: Area) -> Result<Option<Patch>, VisionError> {
    let (w, h) = (header.width as f64, header.height as f64);
    let (upright_w, upright_h) = if swaps_axes(orientation) { (h, w) } else { (w, h) };
    let stored = upright_to_stored(area, upright_w, upright_h, orientation);
    // libjpeg's scaled size is the full size times M/8, rounded up.
    let m = scale_num.clamp(1, 8);
    let scaled = |full: u32| (full as u64 * m as u64).div_ceil(8) as f64;
    let (sw, sh) = (scaled(header.width), scaled(header.height));
    let (fx, fy) = (sw / w, sh / h);
    let x0 = (stored.x0 * fx).floor().max(0.0);
    let y0 = (stored.y0 * fy).floor().max(0.0);
    let x1 = (stored.x1 * fx).ceil().min(sw);
    let y1 = (stored.y1 * fy).ceil().min(sh);

    let region = match jpeg_region::decode(bytes, m, x0 as u32, y0 as u32, (x1 - x0) as u32, (y1 - y0) as u32) {
        Ok(region) => region,
        Err(jpeg_region::RegionError::Unsupported) => return Ok(None),
        Err(e @ jpeg_region::RegionError::Decode(_)) => return Err(VisionError::Jpeg(e)),
    };
    let out = &region;
    let image = Mat::new_rows_cols_with_data(out.height as i32, (out.width * 3) as i32, &out.bgr)
        .and_then(|m| m.reshape(3, out.height as i32).and_then(|m| m.try_clone()))?;

    let decoded = Area {
        x0: out.x as f64,
        y0: out.y as f64,
        x1: (out.x + out.width) as f64,
        y1: (out.y + out.height) as f64,
    };
    let placed = stored_to_upright(decoded, out.scaled_width as f64, out.scaled_height as f64, orientation);
    let (upright_sw, upright_sh) =
        if swaps_axes(orientation) { (out.scaled_height, out.scaled_width) } else { (out.scaled_width, out.scaled_height) };
    Ok(Some(Patch {
        image: orient(image, orientation)?,
        x: placed.x0,
        y: placed.y0,
        per_full_x: upright_sw as f64 / upright_w,
        per_full_y: upright_sh as f64 / upright_h,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencv::core::{Scalar, Vector, CV_8UC3};
    use opencv::imgcodecs;

    /// A 64x48 test card with a distinct colour per 16x16 block, as a JPEG.
    fn card() -> (Mat, Vec<u8>) {
        let mut img = Mat::new_rows_cols_with_default(48, 64, CV_8UC3, Scalar::all(0.0)).unwrap();
        for by in 0..3 {
            for bx in 0..4 {
                let colour = Scalar::new(40.0 + 60.0 * bx as f64, 40.0 + 80.0 * by as f64, 200.0 - 50.0 * bx as f64, 0.0);
                let mut block = Mat::roi_mut(&mut img, core::Rect::new(bx * 16, by * 16, 16, 16)).unwrap();
                block.set_to(&colour, &core::no_array()).unwrap();
            }
        }
        let mut jpeg = Vector::<u8>::new();
        imgcodecs::imencode(".jpg", &img, &mut jpeg, &Vector::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 95])).unwrap();
        (img, jpeg.to_vec())
    }

    /// The mean absolute difference of two BGR images, in the channel where it is largest.
    fn mean_difference(a: &impl core::ToInputArray, b: &impl core::ToInputArray) -> f64 {
        let mut diff = Mat::default();
        core::absdiff(a, b, &mut diff).unwrap();
        let mean = core::mean(&diff, &core::no_array()).unwrap();
        mean[0].max(mean[1]).max(mean[2])
    }

    #[test]
    fn mapping_round_trips_for_every_orientation() {
        let area = Area { x0: 3.0, y0: 5.0, x1: 20.0, y1: 11.0 };
        for o in 1..=8u8 {
            let up = stored_to_upright(area, 64.0, 48.0, o);
            let (uw, uh) = if swaps_axes(o) { (48.0, 64.0) } else { (64.0, 48.0) };
            assert_eq!(upright_to_stored(up, uw, uh, o), area, "orientation {o}");
        }
    }

    /// Decodes `area` of `jpeg` at full scale, checks it comes out `area`'s size, and
    /// returns its mean pixel difference from the same window of `upright`.
    fn region_difference(jpeg: &[u8], header: Header, orientation: u8, area: Area, upright: &Mat) -> f64 {
        let patch = decode_area(jpeg, header, orientation, 8, area).unwrap().unwrap();
        let rect = patch.pixels_of(area);
        let window = core::Rect::new(area.x0 as i32, area.y0 as i32, (area.x1 - area.x0) as i32, (area.y1 - area.y0) as i32);
        assert_eq!((rect.width, rect.height), (window.width, window.height), "orientation {orientation}");
        let ours = Mat::roi(&patch.image, rect).unwrap();
        let theirs = Mat::roi(upright, window).unwrap();
        mean_difference(&ours, &theirs)
    }

    #[test]
    fn a_region_matches_the_same_window_of_a_whole_decode() {
        let (_, jpeg) = card();
        let whole = imgcodecs::imdecode(&Vector::<u8>::from_slice(&jpeg), imgcodecs::IMREAD_COLOR).unwrap();
        let header = Header { width: 64, height: 48 };
        let area = Area { x0: 16.0, y0: 16.0, x1: 48.0, y1: 32.0 };
        // Chroma upsampling at the cut edges has no neighbours to blend with
        // (libjpeg-turbo documents this), so single pixels may differ; on average they agree.
        let difference = region_difference(&jpeg, header, 1, area, &whole);
        assert!(difference < 1.5, "region decode differs from the whole decode: {difference}");
    }

    #[test]
    fn oriented_patches_match_the_upright_whole_image() {
        // For each orientation, the upright photo is `orient(stored)`; a window of it
        // must come out of `decode_area` with the same pixels.
        let (stored, jpeg) = card();
        let header = Header { width: 64, height: 48 };
        for o in 1..=8u8 {
            let upright = orient(stored.clone(), o).unwrap();
            let area = Area { x0: 8.0, y0: 16.0, x1: 40.0, y1: 40.0 };
            let difference = region_difference(&jpeg, header, o, area, &upright);
            assert!(difference < 6.0, "orientation {o}: mean difference {difference}");
        }
    }

    #[test]
    fn scaled_regions_have_the_scaled_size() {
        let (_, jpeg) = card();
        let header = Header { width: 64, height: 48 };
        let area = Area { x0: 0.0, y0: 0.0, x1: 64.0, y1: 48.0 };
        let patch = decode_area(&jpeg, header, 1, 4, area).unwrap().unwrap();
        assert_eq!((patch.image.cols(), patch.image.rows()), (32, 24));
        assert_eq!(patch.per_full_x, 0.5);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let header = Header { width: 64, height: 48 };
        let area = Area { x0: 0.0, y0: 0.0, x1: 8.0, y1: 8.0 };
        assert!(matches!(decode_area(b"\xFF\xD8\xFFnot really", header, 1, 8, area), Err(VisionError::Jpeg(_))));
    }
}
