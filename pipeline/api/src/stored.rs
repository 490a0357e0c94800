//! Stored files (originals, crops) served as data: whatever an uploader put in an
//! archive, the browser gets a type read from its bytes and a policy under which
//! nothing of it runs.

use axum::http::header;
use axum::response::IntoResponse;

/// A stored file (an original, a crop) as an answer that nothing can run: its media
/// type from its bytes (never from its name, which the uploader chose), no sniffing,
/// a sandboxing Content-Security-Policy (HTML or SVG posing as an image runs no script,
/// submits nothing and reads nothing of this origin), and a download unless it is an
/// image the dashboard shows.
pub fn stored_file(name: &str, bytes: bytes::Bytes) -> impl IntoResponse {
    let media_type = media_type(&bytes);
    let disposition = match media_type {
        "application/octet-stream" => format!("attachment; filename=\"{name}.bin\""),
        image => format!("inline; filename=\"{name}.{}\"", image.trim_start_matches("image/")),
    };
    (
        [
            (header::CONTENT_TYPE, media_type.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CONTENT_SECURITY_POLICY, STORED_FILE_POLICY.to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        bytes,
    )
}

/// No script, no form, no plugin, nothing loaded: a stored file is data.
const STORED_FILE_POLICY: &str = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'";

/// The media type of an image's bytes, from its signature (an image that is not
/// one is still served, as bytes).
fn media_type(bytes: &[u8]) -> &'static str {
    use imagesize::ImageType;
    match imagesize::image_type(bytes) {
        Ok(ImageType::Jpeg) => "image/jpeg",
        Ok(ImageType::Png) => "image/png",
        Ok(ImageType::Gif) => "image/gif",
        Ok(ImageType::Webp) => "image/webp",
        Ok(ImageType::Bmp) => "image/bmp",
        Ok(ImageType::Tiff) => "image/tiff",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn media_types_come_from_the_bytes() {
        let padded = |head: &[u8]| [head, &[0u8; 32]].concat();
        assert_eq!(super::media_type(&padded(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F', 0])), "image/jpeg");
        assert_eq!(super::media_type(&padded(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")), "image/png");
        assert_eq!(super::media_type(b"not an image at all"), "application/octet-stream");
    }
}
