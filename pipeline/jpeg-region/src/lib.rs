//! # jpeg-region: decode one rectangle of a JPEG
//!
//! A face crop needs a window that is often a tenth of the photo. The C shim in
//! `jpeg_region.c` asks the system's libjpeg-turbo to decode one rectangle at a
//! scale of M/8 (any M in 1..=8), skipping the inverse DCT and colour
//! conversion outside it and stopping after its last row.
//!
//! This crate is only the safe boundary around that shim: pixel coordinates in,
//! BGR bytes out. Orientation and geometry live in `facepipe-vision`.
//!
//! ## Layout
//! - `src/jpeg_region.c`: the shim over libjpeg's `jpeg_crop_scanline`/`jpeg_skip_scanlines`.
//! - `src/lib.rs`: [`decode`], [`Region`] and [`RegionError`].

use std::ffi::{c_char, c_int, c_uint, c_ulong, CStr};

#[repr(C)]
struct FpRegion {
    pixels: *mut u8,
    width: c_uint,
    height: c_uint,
    x: c_uint,
    y: c_uint,
    scaled_width: c_uint,
    scaled_height: c_uint,
}

const FP_OK: c_int = 0;
const FP_UNSUPPORTED: c_int = 2;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn fp_decode_region(
        data: *const u8,
        len: c_ulong,
        scale_num: c_int,
        x: c_uint,
        y: c_uint,
        w: c_uint,
        h: c_uint,
        out: *mut FpRegion,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    fn fp_free(pixels: *mut u8);
}

/// A decoded rectangle of a JPEG, in the stored (not EXIF-turned) orientation.
#[derive(Debug, Clone)]
pub struct Region {
    /// `height` rows of `width * 3` bytes, BGR.
    pub bgr: Vec<u8>,
    /// Width of the decoded rectangle, in scaled pixels.
    pub width: u32,
    /// Height of the decoded rectangle, in scaled pixels.
    pub height: u32,
    /// Left edge of the rectangle in the scaled image (libjpeg widens it to an iMCU boundary).
    pub x: u32,
    /// Top edge of the rectangle in the scaled image.
    pub y: u32,
    /// Width of the whole image at this scale.
    pub scaled_width: u32,
    /// Height of the whole image at this scale.
    pub scaled_height: u32,
}

/// Why a rectangle could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// libjpeg cannot give BGR for this file (CMYK, for example): decode it whole instead.
    #[error("libjpeg cannot decode this JPEG's colour space to BGR")]
    Unsupported,
    /// The data is not a readable JPEG (libjpeg's own message).
    #[error("{0}")]
    Decode(String),
}

/// Decodes the rectangle `x, y, w, h` (pixels of the image scaled by
/// `scale_num`/8, `scale_num` clamped to 1..=8) of the JPEG `data`.
pub fn decode(data: &[u8], scale_num: u32, x: u32, y: u32, w: u32, h: u32) -> Result<Region, RegionError> {
    let mut out = FpRegion { pixels: std::ptr::null_mut(), width: 0, height: 0, x: 0, y: 0, scaled_width: 0, scaled_height: 0 };
    let mut message = [0 as c_char; 200];
    // SAFETY: `data` outlives the call; the shim writes only into `out` and `message`
    // (whose length it is given), and never keeps a pointer to either.
    let rc = unsafe {
        fp_decode_region(
            data.as_ptr(),
            data.len() as c_ulong,
            scale_num.clamp(1, 8) as c_int,
            x,
            y,
            w.max(1),
            h.max(1),
            &mut out,
            message.as_mut_ptr(),
            message.len(),
        )
    };
    match rc {
        FP_OK => {}
        FP_UNSUPPORTED => return Err(RegionError::Unsupported),
        _ => {
            // SAFETY: the shim wrote a NUL-terminated message into the buffer.
            let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy().into_owned();
            return Err(RegionError::Decode(text));
        }
    }
    // SAFETY: the shim allocated `height` rows of `width * 3` bytes at `pixels`.
    let bgr = unsafe { std::slice::from_raw_parts(out.pixels, out.width as usize * out.height as usize * 3) }.to_vec();
    // SAFETY: `pixels` came from the shim and is freed once, after the copy.
    unsafe { fp_free(out.pixels) };
    Ok(Region {
        bgr,
        width: out.width,
        height: out.height,
        x: out.x,
        y: out.y,
        scaled_width: out.scaled_width,
        scaled_height: out.scaled_height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_decode_error_with_libjpegs_reason() {
        match decode(b"not a jpeg at all", 8, 0, 0, 4, 4) {
            Err(RegionError::Decode(reason)) => assert!(!reason.is_empty()),
            other => panic!("expected a decode error, got {other:?}"),
        }
    }
}
