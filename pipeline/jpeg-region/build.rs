//! Compiles the small C shim that decodes one rectangle of a JPEG with the
//! system's libjpeg-turbo (`libjpeg-dev`, which OpenCV's packages already need).
fn main() {
    println!("cargo:rerun-if-changed=src/jpeg_region.c");
    cc::Build::new().file("src/jpeg_region.c").warnings(true).compile("jpeg_region");
    println!("cargo:rustc-link-lib=jpeg");
}
