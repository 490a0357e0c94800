//! The labelled photos of `../shared/data/faces` (`$PIPELINE_SHARED_DIR`), and ZIPs made of them.

use std::path::{Path, PathBuf};

pub use facepipe_lab::eval::{iou, Labelled};

use super::shared_dir;

/// The labelled photos.
pub fn labelled_photos() -> Vec<Labelled> {
    let path = shared_dir().join("data/faces/manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set PIPELINE_SHARED_DIR)", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Writes a ZIP of the given (name, bytes) entries.
pub fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, data) in entries {
        let options = zip::write::SimpleFileOptions::default();
        w.start_file(name.as_str(), options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

/// The bytes of a labelled photo.
pub fn photo_bytes(photo: &Labelled) -> Vec<u8> {
    std::fs::read(shared_dir().join("data/faces").join(&photo.file)).unwrap()
}

/// A ZIP of labelled photos, built up: which photos, how many copies, what else is
/// planted in it. The one way the tests make a batch of real photos.
#[derive(Default)]
pub struct PhotoZip {
    entries: Vec<(String, Vec<u8>)>,
}

impl PhotoZip {
    /// `photos`, each under its own file name.
    pub fn of<'a>(photos: impl IntoIterator<Item = &'a Labelled>) -> Self {
        Self { entries: photos.into_iter().map(|p| (p.file.clone(), photo_bytes(p))).collect() }
    }

    /// `count` of `photos`, from the first again when there are fewer, each named
    /// `<n>-<file>` so that repeats are distinct entries.
    pub fn cycled(photos: &[Labelled], count: usize) -> Self {
        let entries = photos.iter().cycle().take(count).enumerate().map(|(i, p)| (format!("{i:03}-{}", p.file.replace('/', "_")), photo_bytes(p)));
        Self { entries: entries.collect() }
    }

    /// Every entry `copies` times, the n-th copy under `copy<n>/`.
    pub fn copies(self, copies: usize) -> Self {
        let entries = (0..copies).flat_map(|c| self.entries.iter().map(move |(name, bytes)| (format!("copy{c}/{name}"), bytes.clone())));
        Self { entries: entries.collect() }
    }

    /// One more entry (a planted bad image, a text file).
    pub fn with(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.entries.push((name.to_string(), bytes.into()));
        self
    }

    /// Entries extract counts as images (by their extension, as its default topology does).
    pub fn images(&self) -> usize {
        let extensions = facepipe_core::topology::ExtractParams::default().image_extensions;
        self.entries.iter().filter(|(name, _)| facepipe_core::keys::extension(name).is_some_and(|e| extensions.contains(&e))).count()
    }

    /// The entries, as written.
    pub fn entries(&self) -> &[(String, Vec<u8>)] {
        &self.entries
    }

    /// Writes the ZIP to `path`; returns the path and its image count.
    pub fn write(&self, path: &Path) -> (PathBuf, usize) {
        write_zip(path, &self.entries);
        (path.to_path_buf(), self.images())
    }
}

/// A ZIP of `count` labelled photos (see [`PhotoZip::cycled`]), written as `dir/name`.
pub fn photos_zip(dir: &Path, name: &str, count: usize) -> PathBuf {
    PhotoZip::cycled(&labelled_photos(), count).write(&dir.join(name)).0
}
