//! # facepipe-archive: reading a ZIP entry by entry with bounded memory
//!
//! Extract unpacks archives with it; the HTTP API counts an upload's images with it
//! before the batch starts. Neither links the other.
//!
//! One central-directory record and one entry at a time are held in memory
//! (the directory is walked record by record, never indexed whole), so an
//! archive of any size and any number of entries unpacks in constant memory. The archive is
//! any `Read + Seek`: a local file, or a remote object read by ranged GETs
//! (the object store's ranged reader), never downloaded whole. Each
//! entry becomes an [`Entry`]: an image to process, a non-image to skip, or an
//! image that cannot be read (recorded as that image's failure, not the batch's).
//!
//! A failure to read the archive itself (a local I/O error, an object store
//! that stopped answering) is never blamed on the entry being read: it ends the
//! whole read with [`ArchiveError::Io`], a transient error, so the job is tried
//! again instead of recording good images as failed.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};

use facepipe_core::keys;
use facepipe_core::topology::ExtractParams;
// Walks the central directory record by record instead of indexing it whole
// (the indexed `ZipArchive` keeps about 0.6 KiB per entry: 600 MiB for a million).
use zip::unstable::read::ZipIterable;

/// Why an archive could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file is missing or unreadable.
    #[error("cannot open archive: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a ZIP, or its central directory is corrupt.
    #[error("not a readable ZIP archive: {0}")]
    Invalid(#[from] zip::result::ZipError),
    /// The archive exceeds a configured cap (entries or total size).
    #[error("archive refused: {0}")]
    TooLarge(String),
}

/// One entry of the archive.
#[derive(Debug)]
pub enum Entry {
    /// An image entry and its bytes.
    Image {
        /// Dense index among image entries (0, 1, 2, ...), stable for the same archive.
        index: usize,
        /// Entry name in the archive.
        name: String,
        /// Uncompressed content.
        bytes: Vec<u8>,
    },
    /// An image entry that could not be read (too large, encrypted, corrupt data).
    Unreadable {
        /// Dense index among image entries.
        index: usize,
        /// Entry name in the archive.
        name: String,
        /// Why.
        reason: String,
    },
    /// A file whose extension is not an image's; skipped and counted.
    Skipped {
        /// Entry name in the archive.
        name: String,
    },
}

/// Totals after the whole archive was read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Image entries (readable or not): the batch's image count.
    pub images: usize,
    /// Names of skipped non-image entries.
    pub skipped: Vec<String>,
}

/// Reads the archive entry by entry, handing each to `sink`; stops early when `sink` returns false.
///
/// `directory` and `bodies` are two readers of the same archive: one walks the
/// central directory, the other the entries' data, so each reads in order. (One
/// reader for both would jump between the end of the archive and each entry: a
/// ranged reader would fetch a window again on every jump.)
pub fn read_entries<R: Read + Seek>(
    directory: R,
    bodies: R,
    params: &ExtractParams,
    mut sink: impl FnMut(Entry) -> bool,
) -> Result<Summary, ArchiveError> {
    let fault = Fault::default();
    let directory = Watched { inner: directory, fault: fault.clone() };
    let mut bodies = Watched { inner: bodies, fault: fault.clone() };
    let mut archive = open_checked(directory, params).map_err(|e| fault.take().map_or(e, ArchiveError::Io))?;
    let mut summary = Summary::default();
    let files = archive.files()?;
    while let Some(record) = files.next() {
        // A central-directory record that does not parse ends the walk: the directory is corrupt.
        let record = record.map_err(|e| fault.take().map_or(ArchiveError::Invalid(e), ArchiveError::Io))?;
        let name = record.name().map(|n| n.into_owned()).unwrap_or_else(|_| String::from_utf8_lossy(record.name_raw()).into_owned());
        let opened = record.with_reader(&mut bodies, zip::ZipReadOptions::new());
        let read = opened.map(|entry| read_entry(entry, &name, summary.images, params));
        // The source failed under this entry: the archive is unreadable for now, not the entry.
        if let Some(e) = fault.take() {
            return Err(ArchiveError::Io(e));
        }
        let entry = match read {
            Ok(entry) => entry,
            Err(e) if is_image_name(&name, params) => Some(Entry::Unreadable { index: summary.images, name, reason: e.to_string() }),
            Err(_) => Some(Entry::Skipped { name }),
        };
        let Some(entry) = entry else { continue };
        match &entry {
            Entry::Image { .. } | Entry::Unreadable { .. } => summary.images += 1,
            Entry::Skipped { name } => summary.skipped.push(name.clone()),
        }
        if !sink(entry) {
            break;
        }
    }
    Ok(summary)
}

/// Reads the ZIP file at `path` entry by entry (see [`read_entries`]).
pub fn read_file_entries(path: &Path, params: &ExtractParams, sink: impl FnMut(Entry) -> bool) -> Result<Summary, ArchiveError> {
    read_entries(BufReader::new(File::open(path)?), BufReader::new(File::open(path)?), params, sink)
}

/// Counts the image entries of `path` from its central directory alone (no entry
/// is decompressed): the batch's image count as extract will find it.
pub fn count_images(path: &Path, params: &ExtractParams) -> Result<usize, ArchiveError> {
    let mut archive = open_checked(BufReader::new(File::open(path)?), params)?;
    let mut images = 0;
    for record in archive.files()? {
        let record = record?;
        let name = record.name()?;
        if !record.is_dir() && is_image_name(&name, params) {
            images += 1;
        }
    }
    Ok(images)
}

/// Opens an archive and applies the caps on the archive as a whole, from its
/// central directory, before any entry is read: one pass over the directory's
/// records, none of them kept.
fn open_checked<R: Read + Seek>(source: R, params: &ExtractParams) -> Result<ZipIterable<R>, ArchiveError> {
    let mut archive = ZipIterable::try_new(source, zip::read::Config::default())?;
    if archive.len() > params.max_entries {
        return Err(ArchiveError::TooLarge(format!(
            "{} entries, more than max_entries = {}",
            archive.len(),
            params.max_entries
        )));
    }
    let mut total: u128 = 0;
    for record in archive.files()? {
        total += u128::from(record?.size());
    }
    if total > params.max_total_bytes as u128 {
        return Err(ArchiveError::TooLarge(format!(
            "{total} uncompressed bytes, more than max_total_bytes = {}",
            params.max_total_bytes
        )));
    }
    Ok(archive)
}

/// The archive's source, keeping the first error it returns, so that a failure
/// of the source is told apart from corrupt entry data (which the decompressors
/// report above it).
struct Watched<R> {
    inner: R,
    fault: Fault,
}

/// The first error of a [`Watched`] source, until taken.
#[derive(Clone, Default)]
struct Fault(Arc<Mutex<Option<io::Error>>>);

impl Fault {
    fn record(&self, e: &io::Error) {
        // A seek the reader itself got wrong (before the start) is no failure of the source.
        if e.kind() == io::ErrorKind::InvalidInput {
            return;
        }
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            // io::Error is not Clone: keep its kind and its whole message.
            *slot = Some(io::Error::new(e.kind(), facepipe_core::error::chain(e)));
        }
    }

    fn take(&self) -> Option<io::Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl<R> Watched<R> {
    fn watch<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result {
            self.fault.record(e);
        }
        result
    }
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.inner.read(buf);
        self.watch(result)
    }
}

impl<R: Seek> Seek for Watched<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let result = self.inner.seek(pos);
        self.watch(result)
    }
}

fn is_image_name(name: &str, params: &ExtractParams) -> bool {
    keys::extension(name).is_some_and(|ext| params.image_extensions.iter().any(|e| e.eq_ignore_ascii_case(&ext)))
}

/// Classifies and reads one entry named `name`; `None` for directories.
fn read_entry<R: Read>(mut entry: zip::read::ZipFile<'_, R>, name: &str, index: usize, params: &ExtractParams) -> Option<Entry> {
    if entry.is_dir() {
        return None;
    }
    let name = name.to_string();
    if !is_image_name(&name, params) {
        return Some(Entry::Skipped { name });
    }
    if entry.is_symlink() {
        // A link's content is a path, not an image; never follow it.
        let reason = "entry is a symbolic link, not a file".to_string();
        return Some(Entry::Unreadable { index, name, reason });
    }
    if entry.size() > params.max_entry_bytes {
        let reason = format!("entry of {} bytes exceeds the {} byte limit", entry.size(), params.max_entry_bytes);
        return Some(Entry::Unreadable { index, name, reason });
    }
    let ratio = entry.size() / entry.compressed_size().max(1);
    if entry.size() > 1 << 20 && ratio > params.max_compression_ratio {
        let reason = format!(
            "entry inflates {ratio} times (more than max_compression_ratio = {}): a decompression bomb",
            params.max_compression_ratio
        );
        return Some(Entry::Unreadable { index, name, reason });
    }
    // The declared size can lie; never read past the limit whatever it says.
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    let read = (&mut entry).take(params.max_entry_bytes + 1).read_to_end(&mut bytes);
    match read {
        Err(e) => Some(Entry::Unreadable { index, name, reason: format!("cannot read entry: {e}") }),
        Ok(n) if n as u64 > params.max_entry_bytes => Some(Entry::Unreadable {
            index,
            name,
            reason: format!("entry exceeds the {} byte limit", params.max_entry_bytes),
        }),
        Ok(_) => Some(Entry::Image { index, name, bytes }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_with(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(file.reopen().unwrap());
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, zip::write::SimpleFileOptions::default()).unwrap();
            } else {
                w.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
                w.write_all(data).unwrap();
            }
        }
        w.finish().unwrap();
        file
    }

    #[test]
    fn classifies_entries_with_dense_image_indices() {
        let zip = zip_with(&[
            ("photos/", b""),
            ("photos/a.jpg", b"aaa"),
            ("notes.txt", b"hello"),
            ("photos/B.PNG", b"bbbb"),
        ]);
        let mut seen = Vec::new();
        let summary = read_file_entries(zip.path(), &ExtractParams::default(), |e| {
            seen.push(match e {
                Entry::Image { index, name, bytes } => format!("image {index} {name} {}", bytes.len()),
                Entry::Unreadable { index, name, .. } => format!("bad {index} {name}"),
                Entry::Skipped { name } => format!("skip {name}"),
            });
            true
        })
        .unwrap();
        assert_eq!(seen, vec!["image 0 photos/a.jpg 3", "skip notes.txt", "image 1 photos/B.PNG 4"]);
        assert_eq!(summary, Summary { images: 2, skipped: vec!["notes.txt".into()] });
    }

    #[test]
    fn oversized_entries_are_unreadable_images() {
        let zip = zip_with(&[("big.jpg", &[0u8; 2048]), ("ok.jpg", b"x")]);
        let params = ExtractParams { max_entry_bytes: 1024, ..ExtractParams::default() };
        let mut kinds = Vec::new();
        read_file_entries(zip.path(), &params, |e| {
            kinds.push(matches!(e, Entry::Unreadable { .. }));
            true
        })
        .unwrap();
        assert_eq!(kinds, vec![true, false]);
    }

    fn kinds(zip: &Path, params: &ExtractParams) -> Vec<String> {
        let mut out = Vec::new();
        read_file_entries(zip, params, |e| {
            out.push(match e {
                Entry::Image { name, .. } => format!("image {name}"),
                Entry::Unreadable { name, reason, .. } => format!("bad {name}: {reason}"),
                Entry::Skipped { name } => format!("skip {name}"),
            });
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn hostile_entries() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(file.reopen().unwrap());
        let deflate = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("../../etc/evil.jpg", deflate).unwrap();
        w.write_all(b"x").unwrap();
        w.start_file("/abs/path.jpg", deflate).unwrap();
        w.write_all(b"y").unwrap();
        w.add_symlink("link.jpg", "/etc/passwd", deflate).unwrap();
        w.start_file("bomb.jpg", deflate).unwrap();
        w.write_all(&vec![0u8; 8 << 20]).unwrap();
        w.start_file("inner.zip", deflate).unwrap();
        w.write_all(b"PK\x03\x04").unwrap();
        w.start_file("dup.jpg", deflate).unwrap();
        w.write_all(b"1").unwrap();
        // This writer refuses a second `dup.jpg`; archives from other tools may hold one, and
        // it still gets its own image id, which comes from the entry's position, not its name.
        w.start_file("dup.jpg", deflate).unwrap_err();
        w.finish().unwrap();
        let got = kinds(file.path(), &ExtractParams::default());
        assert_eq!(got[0], "image ../../etc/evil.jpg", "names are data; keys never use them");
        assert_eq!(got[1], "image /abs/path.jpg");
        assert!(got[2].starts_with("bad link.jpg: entry is a symbolic link"), "{got:?}");
        assert!(got[3].starts_with("bad bomb.jpg: entry inflates"), "{got:?}");
        assert_eq!(got[4], "skip inner.zip", "nested archives are not images");
        assert_eq!(got[5], "image dup.jpg");
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn archive_caps_refuse_the_whole_archive() {
        let zip = zip_with(&[("a.jpg", b"a"), ("b.jpg", b"b"), ("c.jpg", b"c")]);
        let few = ExtractParams { max_entries: 2, ..ExtractParams::default() };
        let err = read_file_entries(zip.path(), &few, |_| true).unwrap_err().to_string();
        assert!(err.contains("3 entries, more than max_entries = 2"), "{err}");
        let small = ExtractParams { max_total_bytes: 2, ..ExtractParams::default() };
        let err = read_file_entries(zip.path(), &small, |_| true).unwrap_err().to_string();
        assert!(err.contains("max_total_bytes"), "{err}");
    }

    /// A source that fails after `budget` bytes, as an object store that stops answering.
    struct FailingAfter {
        inner: std::io::Cursor<Vec<u8>>,
        budget: usize,
    }

    impl Read for FailingAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::Error::other("object store: connection refused"));
            }
            let n = buf.len().min(self.budget);
            let n = self.inner.read(&mut buf[..n])?;
            self.budget -= n;
            Ok(n)
        }
    }

    impl Seek for FailingAfter {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn a_failing_source_fails_the_read_not_the_entry() {
        // Bytes that do not deflate, as a JPEG's.
        let mut state = 12345u32;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n).map(|_| { state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345); (state >> 16) as u8 }).collect()
        };
        let photos: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("p{i}.jpg"), noise(10_000))).collect();
        let entries: Vec<(&str, &[u8])> = photos.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let zip = std::fs::read(zip_with(&entries).path()).unwrap();
        // The entries' reader fails after two entries' worth.
        let directory = FailingAfter { inner: std::io::Cursor::new(zip.clone()), budget: usize::MAX };
        let bodies = FailingAfter { inner: std::io::Cursor::new(zip.clone()), budget: 25_000 };
        let mut seen = Vec::new();
        let err = read_entries(directory, bodies, &ExtractParams::default(), |e| {
            seen.push(matches!(e, Entry::Image { .. }));
            true
        })
        .unwrap_err();
        assert!(matches!(&err, ArchiveError::Io(e) if e.to_string().contains("connection refused")), "{err}");
        assert!(!seen.is_empty() && seen.iter().all(|ok| *ok), "entries before the failure are whole images: {seen:?}");
        // Failing while the central directory is read is the same error.
        let directory = FailingAfter { inner: std::io::Cursor::new(zip.clone()), budget: 10 };
        let bodies = FailingAfter { inner: std::io::Cursor::new(zip), budget: usize::MAX };
        assert!(matches!(read_entries(directory, bodies, &ExtractParams::default(), |_| true), Err(ArchiveError::Io(_))));
    }

    /// The archive in a remote store, read through ranged GETs.
    #[tokio::test]
    async fn reads_an_archive_from_a_remote_store_in_place() {
        let zip = zip_with(&[("a.jpg", b"aaa"), ("notes.txt", b"hello"), ("b.jpg", &[7u8; 50_000])]);
        let store = facepipe_runtime::store::Store::in_memory();
        store.put_file("uploads/b.zip", zip.path()).await.unwrap();
        let reader = store.reader("uploads/b.zip").await.unwrap();
        assert!(matches!(reader, facepipe_runtime::store::ObjectReader::Remote(_)));
        let bodies = store.reader("uploads/b.zip").await.unwrap();
        let (summary, sizes) = tokio::task::spawn_blocking(move || {
            let mut sizes = Vec::new();
            let summary = read_entries(reader, bodies, &ExtractParams::default(), |e| {
                if let Entry::Image { bytes, .. } = e {
                    sizes.push(bytes.len());
                }
                true
            });
            (summary, sizes)
        })
        .await
        .unwrap();
        assert_eq!(summary.unwrap(), Summary { images: 2, skipped: vec!["notes.txt".into()] });
        assert_eq!(sizes, vec![3, 50_000]);
    }

    #[test]
    fn empty_archive_has_no_images() {
        let zip = zip_with(&[]);
        assert_eq!(read_file_entries(zip.path(), &ExtractParams::default(), |_| true).unwrap(), Summary::default());
    }

    #[test]
    fn not_a_zip_is_an_archive_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"this is not a zip").unwrap();
        assert!(matches!(read_file_entries(file.path(), &ExtractParams::default(), |_| true), Err(ArchiveError::Invalid(_))));
        assert!(matches!(
            read_file_entries(Path::new("/nonexistent/x.zip"), &ExtractParams::default(), |_| true),
            Err(ArchiveError::Io(_))
        ));
    }
}
