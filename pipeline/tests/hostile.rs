//! Broken and unusual input through the real pipeline: every planted entry
//! gets a clear recorded outcome and no worker dies.

mod support;

use std::time::Duration;

use opencv::core::{self, Mat, Vector};
use opencv::imgcodecs;
use opencv::prelude::*;
use support::{shared_dir, write_zip, Deployment};

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
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("gray.jpg", encode(".jpg", &converted(&astronaut, opencv::imgproc::COLOR_BGR2GRAY)), "cropped", ""),
        ("alpha.png", encode(".png", &converted(&astronaut, opencv::imgproc::COLOR_BGR2BGRA)), "cropped", ""),
        ("sixteen-bit.png", encode(".png", &deep), "cropped", ""),
        ("photo.webp", encode(".webp", &astronaut), "cropped", ""),
        ("photo.tiff", encode(".tiff", &astronaut), "cropped", ""),
        ("photo.bmp", encode(".bmp", &astronaut), "cropped", ""),
        ("png-named.jpg", encode(".png", &astronaut), "cropped", ""),
        ("tiny.png", encode(".png", &tiny), "no_face", ""),
        ("sliver.png", encode(".png", &sliver), "no_face", ""),
        ("pixel-bomb.png", png_header_claiming(50_000, 50_000), "failed", "megapixel limit"),
        ("empty.jpg", Vec::new(), "failed", "not a supported image"),
        ("text.png", b"just some text, not a picture".to_vec(), "failed", "not a supported image"),
        // libjpeg decodes what is there (the top, with the face) and greys the rest.
        ("truncated.jpg", jpeg[..jpeg.len() * 6 / 10].to_vec(), "cropped", ""),
        ("headless.jpg", jpeg[..jpeg.len() / 3].iter().skip(2).copied().collect(), "failed", "image"),
    ];
    let entries: Vec<(String, Vec<u8>)> = cases.iter().map(|(n, b, _, _)| (n.to_string(), b.clone())).collect();
    let zip = d.dir.path().join("hostile.zip");
    write_zip(&zip, &entries);
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "hostile"]);
    let status = d.wait_for_batch("hostile", Duration::from_secs(120)).await;
    assert_eq!(status.status, "completed");

    let results = d.db().await.results("hostile").await.unwrap();
    eprintln!("{:<16} {:<8} error", "entry", "status");
    for (name, _, want, error_text) in &cases {
        let r = results.iter().find(|r| r.entry == *name).unwrap();
        eprintln!("{:<16} {:<8} {}", name, r.status, r.error.as_deref().unwrap_or(""));
        assert_eq!(r.status, *want, "{name}: {r:?}");
        if *want == "failed" {
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
