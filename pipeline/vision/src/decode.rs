//! Decoding that does as little work as the task needs.
//!
//! JPEG can decode at 1/2, 1/4 or 1/8 scale straight from the DCT
//! coefficients (`IMREAD_REDUCED_*`), several times cheaper than a full decode
//! followed by a resize. The reduction is picked from the header's dimensions
//! before any pixel is decoded. OpenCV applies the EXIF orientation, so the
//! decoded image is upright.

use opencv::core::Mat;
use opencv::imgcodecs;
use opencv::prelude::*;

use super::VisionError;
use facepipe_core::telemetry::Step;

/// What the header says about an image, before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Stored width (before EXIF orientation).
    pub width: u32,
    /// Stored height (before EXIF orientation).
    pub height: u32,
}

/// Reads dimensions from the header and enforces the megapixel limit.
pub fn probe(bytes: &[u8], max_megapixels: f64) -> Result<Header, VisionError> {
    let size = imagesize::blob_size(bytes).map_err(VisionError::Unsupported)?;
    let (w, h) = (size.width as u64, size.height as u64);
    if w == 0 || h == 0 {
        return Err(VisionError::Empty);
    }
    if (w * h) as f64 > max_megapixels * 1e6 {
        return Err(VisionError::TooLarge { width: w, height: h, limit_mp: max_megapixels });
    }
    Ok(Header { width: w as u32, height: h as u32 })
}

/// The largest DCT reduction (1, 2, 4 or 8) that keeps the longer side at least `min_long_side`.
pub fn reduction_for(header: Header, min_long_side: u32) -> u32 {
    let long = header.width.max(header.height);
    [8, 4, 2].into_iter().find(|r| long / r >= min_long_side).unwrap_or(1)
}

/// An upright decoded image and how it maps onto the full-resolution original.
pub struct Decoded {
    /// 8-bit BGR pixels.
    pub image: Mat,
    /// Width of the upright full-resolution original.
    pub full_width: u32,
    /// Height of the upright full-resolution original.
    pub full_height: u32,
}

impl Decoded {
    /// Full-resolution pixels per decoded pixel, horizontally and vertically.
    pub fn scale(&self) -> (f64, f64) {
        (
            self.full_width as f64 / self.image.cols() as f64,
            self.full_height as f64 / self.image.rows() as f64,
        )
    }
}

/// Decodes at 1/`reduction` scale (1, 2, 4 or 8) to upright 8-bit BGR.
pub fn decode(bytes: &[u8], header: Header, reduction: u32) -> Result<Decoded, VisionError> {
    let flags = match reduction {
        8 => imgcodecs::IMREAD_REDUCED_COLOR_8,
        4 => imgcodecs::IMREAD_REDUCED_COLOR_4,
        2 => imgcodecs::IMREAD_REDUCED_COLOR_2,
        _ => imgcodecs::IMREAD_COLOR,
    };
    let _timer = Step::Decode.start();
    // A Mat header over the caller's bytes: no copy of the compressed image.
    let buf = Mat::from_slice(bytes)?;
    let image = imgcodecs::imdecode(&buf, flags)?;
    if image.empty() || image.cols() == 0 || image.rows() == 0 {
        return Err(VisionError::NoPixels);
    }
    // EXIF orientation 5-8 swaps the axes; detect that from the decoded shape.
    let (w, h) = (header.width, header.height);
    let swapped = w != h && ((image.cols() > image.rows()) != (w > h));
    let (full_width, full_height) = if swapped { (h, w) } else { (w, h) };
    Ok(Decoded { image, full_width, full_height })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduction_keeps_enough_pixels() {
        let h = |w, h| Header { width: w, height: h };
        assert_eq!(reduction_for(h(4000, 3000), 640), 4);
        assert_eq!(reduction_for(h(1600, 1200), 640), 2);
        assert_eq!(reduction_for(h(640, 480), 640), 1);
        assert_eq!(reduction_for(h(300, 200), 640), 1);
        assert_eq!(reduction_for(h(3000, 4000), 640), 4);
        assert_eq!(reduction_for(h(12000, 9000), 640), 8);
    }

    #[test]
    fn probe_rejects_garbage_and_pixel_bombs() {
        assert!(matches!(probe(b"definitely not an image", 100.0), Err(VisionError::Unsupported(_))));
        // A PNG header claiming 50000x50000 with no pixel data behind it.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&50000u32.to_be_bytes());
        png.extend_from_slice(&50000u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(probe(&png, 100.0), Err(VisionError::TooLarge { .. })));
    }
}
