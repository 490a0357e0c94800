//! Broken and unusual input through the real pipeline: every planted entry
//! gets a clear recorded outcome and no worker dies.

use std::time::Duration;

use opencv::core::{self, Mat, Vector};
use opencv::imgcodecs;
use opencv::prelude::*;
use crate::support::{shared_dir, write_zip, Deployment};
use facepipe_core::domain::{BatchStatus, ImageStatus};

fn encode(ext: &str, image: &Mat) -> Vec<u8> {
    let mut out = Vector::<u8>::new();
    imgcodecs::imencode(ext, image, &mut out, &Vector::new()).unwrap();
    out.to_vec()
}

fn converted(image: &Mat, code: i32) -> Mat {
    let mut out = Mat::default();
    opencv::imgproc::cvt_color(image, &mut out, code, 0).unwrap();
    out
}

/// A PNG whose header claims `w` x `h` pixels, with no pixel data behind it.
fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&w.to_be_bytes());
    png.extend_from_slice(&h.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png
}

#[tokio::test(flavor = "multi_thread")]
async fn every_planted_image_gets_a_clear_outcome_and_no_worker_dies() {
    let mut d = Deployment::start(|_| {}).await;
    let astronaut = imgcodecs::imread(
        &shared_dir().join("data/faces/skimage/astronaut.png"),
        imgcodecs::IMREAD_COLOR,
    )
    .unwrap();
    let mut deep = Mat::default();
    astronaut.convert_to(&mut deep, core::CV_16UC3, 257.0, 0.0).unwrap();
    let jpeg = encode(".jpg", &astronaut);
    let tiny = Mat::new_rows_cols_with_default(8, 8, core::CV_8UC3, core::Scalar::all(90.0)).unwrap();
    let sliver = Mat::new_rows_cols_with_default(20, 4000, core::CV_8UC3, core::Scalar::all(90.0)).unwrap();

    // (entry, bytes, expected status, text the error must contain)
    let cases: Vec<(&str, Vec<u8>, ImageStatus, &str)> = vec![
        ("gray.jpg", encode(".jpg", &converted(&astronaut, opencv::imgproc::COLOR_BGR2GRAY)), ImageStatus::Cropped, ""),
        ("alpha.png", encode(".png", &converted(&astronaut, opencv::imgproc::COLOR_BGR2BGRA)), ImageStatus::Cropped, ""),
        ("sixteen-bit.png", encode(".png", &deep), ImageStatus::Cropped, ""),
        ("photo.webp", encode(".webp", &astronaut), ImageStatus::Cropped, ""),
        ("photo.tiff", encode(".tiff", &astronaut), ImageStatus::Cropped, ""),
        ("photo.bmp", encode(".bmp", &astronaut), ImageStatus::Cropped, ""),
        ("png-named.jpg", encode(".png", &astronaut), ImageStatus::Cropped, ""),
        ("tiny.png", encode(".png", &tiny), ImageStatus::NoFace, ""),
        ("sliver.png", encode(".png", &sliver), ImageStatus::NoFace, ""),
        ("pixel-bomb.png", png_header_claiming(50_000, 50_000), ImageStatus::Failed, "megapixel limit"),
        ("empty.jpg", Vec::new(), ImageStatus::Failed, "not a supported image"),
        ("text.png", b"just some text, not a picture".to_vec(), ImageStatus::Failed, "not a supported image"),
        // libjpeg decodes what is there (the top, with the face) and greys the rest.
        ("truncated.jpg", jpeg[..jpeg.len() * 6 / 10].to_vec(), ImageStatus::Cropped, ""),
        ("headless.jpg", jpeg[..jpeg.len() / 3].iter().skip(2).copied().collect(), ImageStatus::Failed, "image"),
    ];
    let entries: Vec<(String, Vec<u8>)> = cases.iter().map(|(n, b, _, _)| (n.to_string(), b.clone())).collect();
    let zip = d.dir.path().join("hostile.zip");
    write_zip(&zip, &entries);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "hostile"]);
    let status = d.wait_for_batch("hostile", Duration::from_secs(120)).await;
    assert_eq!(status.status, BatchStatus::Completed);

    let results = d.db().await.results("hostile").await.unwrap();
    eprintln!("{:<16} {:<8} error", "entry", "status");
    for (name, _, want, error_text) in &cases {
        let r = results.iter().find(|r| r.entry == *name).unwrap();
        eprintln!("{:<16} {:<8} {}", name, r.status, r.error.as_deref().unwrap_or(""));
        assert_eq!(r.status, *want, "{name}: {r:?}");
        if *want == ImageStatus::Failed {
            let error = r.error.as_deref().unwrap_or_default();
            assert!(error.contains(error_text), "{name}: a clear reason, got `{error}`");
        }
    }
    // No stage process died on any of it.
    let mut exited = Vec::new();
    for (stage, child) in &mut d.stages {
        if child.try_wait().unwrap().is_some() {
            exited.push(*stage);
        }
    }
    assert!(exited.is_empty(), "{exited:?} exited\n{}", d.logs());
}

/// The astronaut as a CMYK JPEG (four components and Adobe's marker, as print
/// workflows write them; OpenCV cannot write one).
fn cmyk_jpeg(bgr: &Mat) -> Vec<u8> {
    let (w, h) = (bgr.cols() as u16, bgr.rows() as u16);
    let pixels = bgr.data_bytes().unwrap();
    let mut cmyk = Vec::with_capacity(pixels.len() / 3 * 4);
    for p in pixels.chunks_exact(3) {
        let (b, g, r) = (p[0], p[1], p[2]);
        let k = 255 - r.max(g).max(b);
        let scale = |v: u8| if k == 255 { 0 } else { ((255 - v - k) as u32 * 255 / (255 - k) as u32) as u8 };
        cmyk.extend_from_slice(&[scale(r), scale(g), scale(b), k]);
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&cmyk, w, h, jpeg_encoder::ColorType::Cmyk).unwrap();
    out
}

/// Sets the "encrypted" flag of entry `name` in both its local header and its
/// central-directory record: to a reader it is a password-protected entry.
fn mark_encrypted(zip: &mut [u8], name: &str) {
    for (signature, flag_at, name_at) in [(b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)] {
        let mut found = false;
        for i in 0..zip.len().saturating_sub(name_at + name.len()) {
            if &zip[i..i + 4] == signature && &zip[i + name_at..i + name_at + name.len()] == name.as_bytes() {
                zip[i + flag_at] |= 1;
                found = true;
            }
        }
        assert!(found, "{name} not found in the archive");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zip64_encrypted_non_utf8_and_cmyk_entries_get_clear_outcomes() {
    use std::io::Write;
    let d = Deployment::start(|_| {}).await;
    let astronaut_png = std::fs::read(shared_dir().join("data/faces/skimage/astronaut.png")).unwrap();
    let astronaut = imgcodecs::imread(&shared_dir().join("data/faces/skimage/astronaut.png"), imgcodecs::IMREAD_COLOR).unwrap();

    // More than 65,535 entries: the archive needs ZIP64's end records. One entry also
    // carries ZIP64 size fields (large_file), one name is not UTF-8 (bytes 0x80-0x9f,
    // no UTF-8 flag: CP437), one entry is encrypted, one image is CMYK.
    let padding = 66_000;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..padding {
        w.start_file(format!("pad/{i}.txt"), stored).unwrap();
        w.write_all(b"x").unwrap();
    }
    for (name, bytes, options) in [
        ("plain.png", &astronaut_png, stored),
        ("zip64-sized.png", &astronaut_png, stored.large_file(true)),
        ("NONUTF8NAME.png", &astronaut_png, stored),
        ("locked.png", &astronaut_png, stored),
        ("cmyk.jpg", &cmyk_jpeg(&astronaut), stored),
    ] {
        w.start_file(name, options).unwrap();
        w.write_all(bytes).unwrap();
    }
    let mut bytes = w.finish().unwrap().into_inner();
    mark_encrypted(&mut bytes, "locked.png");
    let cp437: &[u8] = b"\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a";
    for i in 0..bytes.len() - 11 {
        if &bytes[i..i + 11] == b"NONUTF8NAME" {
            bytes[i..i + 11].copy_from_slice(cp437);
        }
    }
    assert!(bytes.windows(4).any(|w| w == b"PK\x06\x06"), "the archive has a ZIP64 end record");
    let zip = d.dir.path().join("odd.zip");
    std::fs::write(&zip, &bytes).unwrap();

    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "odd"]);
    let status = d.wait_for_batch("odd", Duration::from_secs(180)).await;
    assert_eq!(status.status, BatchStatus::Completed, "{status:?}\n{}", d.logs());
    assert_eq!(status.image_count, Some(5));
    assert_eq!(status.skipped, padding as i32);
    let results = d.db().await.results("odd").await.unwrap();
    let by_name = |name: &str| results.iter().find(|r| r.entry == name).unwrap_or_else(|| panic!("{name}: {results:?}"));
    eprintln!("{:<18} {:<8} error", "entry", "status");
    for r in &results {
        eprintln!("{:<18} {:<8} {}", r.entry, r.status, r.error.as_deref().unwrap_or(""));
    }
    assert_eq!(by_name("plain.png").status, ImageStatus::Cropped);
    assert_eq!(by_name("zip64-sized.png").status, ImageStatus::Cropped);
    assert_eq!(by_name("cmyk.jpg").status, ImageStatus::Cropped, "CMYK is converted, not refused");
    // CP437 0x80-0x8a read as `ÇüéâäàåçêëèÆ...`: a name, decoded, never a path.
    let non_utf8 = results.iter().find(|r| r.entry.starts_with('Ç')).expect("the CP437 name is decoded");
    assert_eq!(non_utf8.status, ImageStatus::Cropped);
    let locked = by_name("locked.png");
    assert_eq!(locked.status, ImageStatus::Failed);
    assert_eq!(locked.failed_stage.map(|s| s.as_str()), Some("extract"));
    let error = locked.error.as_deref().unwrap().to_lowercase();
    assert!(error.contains("password") || error.contains("encrypt"), "a clear reason: {error}");
}
