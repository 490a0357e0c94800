//! Reading a ZIP entry by entry with bounded memory.
//!
//! Only the central directory and one entry at a time are held in memory, so
//! an archive of any size unpacks in constant memory per entry. Each entry
//! becomes an [`Entry`]: an image to process, a non-image to skip, or an image
//! that cannot be read (recorded as that image's failure, not the batch's).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use facepipe_core::keys;
use facepipe_core::topology::ExtractParams;

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

/// Reads `path` entry by entry, handing each to `sink`; stops early when `sink` returns false.
pub fn read_entries(
    path: &Path,
    params: &ExtractParams,
    mut sink: impl FnMut(Entry) -> bool,
) -> Result<Summary, ArchiveError> {
    let mut archive = open_checked(path, params)?;
    let mut summary = Summary::default();
    for i in 0..archive.len() {
        let read = match archive.by_index(i) {
            Ok(entry) => Ok(read_entry(entry, summary.images, params)),
            Err(e) => Err(e),
        };
        let entry = match read {
            Ok(entry) => entry,
            Err(e) => {
                let name = archive.name_for_index(i).unwrap_or("<unnamed>").to_string();
                if is_image_name(&name, params) {
                    Some(Entry::Unreadable { index: summary.images, name, reason: e.to_string() })
                } else {
                    Some(Entry::Skipped { name })
                }
            }
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

/// Counts the image entries of `path` from its central directory alone (no entry
/// is decompressed): the batch's image count as extract will find it.
pub fn count_images(path: &Path, params: &ExtractParams) -> Result<usize, ArchiveError> {
    let archive = open_checked(path, params)?;
    Ok(archive.file_names().filter(|name| !name.ends_with('/') && is_image_name(name, params)).count())
}

/// Opens an archive and applies the caps on the archive as a whole, from its
/// central directory, before any entry is read.
fn open_checked(path: &Path, params: &ExtractParams) -> Result<zip::ZipArchive<BufReader<File>>, ArchiveError> {
    let archive = zip::ZipArchive::new(BufReader::new(File::open(path)?))?;
    if archive.len() > params.max_entries {
        return Err(ArchiveError::TooLarge(format!(
            "{} entries, more than max_entries = {}",
            archive.len(),
            params.max_entries
        )));
    }
    if let Some(total) = archive.decompressed_size().filter(|t| *t > params.max_total_bytes as u128) {
        return Err(ArchiveError::TooLarge(format!(
            "{total} uncompressed bytes, more than max_total_bytes = {}",
            params.max_total_bytes
        )));
    }
    Ok(archive)
}

fn is_image_name(name: &str, params: &ExtractParams) -> bool {
    keys::extension(name).is_some_and(|ext| params.image_extensions.iter().any(|e| e.eq_ignore_ascii_case(&ext)))
}

/// Classifies and reads one entry; `None` for directories.
fn read_entry<R: Read>(mut entry: zip::read::ZipFile<'_, R>, index: usize, params: &ExtractParams) -> Option<Entry> {
    if entry.is_dir() {
        return None;
    }
    let name = entry.name().to_string();
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
        let summary = read_entries(zip.path(), &ExtractParams::default(), |e| {
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
        read_entries(zip.path(), &params, |e| {
            kinds.push(matches!(e, Entry::Unreadable { .. }));
            true
        })
        .unwrap();
        assert_eq!(kinds, vec![true, false]);
    }

    fn kinds(zip: &Path, params: &ExtractParams) -> Vec<String> {
        let mut out = Vec::new();
        read_entries(zip, params, |e| {
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
        let err = read_entries(zip.path(), &few, |_| true).unwrap_err().to_string();
        assert!(err.contains("3 entries, more than max_entries = 2"), "{err}");
        let small = ExtractParams { max_total_bytes: 2, ..ExtractParams::default() };
        let err = read_entries(zip.path(), &small, |_| true).unwrap_err().to_string();
        assert!(err.contains("max_total_bytes"), "{err}");
    }

    #[test]
    fn empty_archive_has_no_images() {
        let zip = zip_with(&[]);
        assert_eq!(read_entries(zip.path(), &ExtractParams::default(), |_| true).unwrap(), Summary::default());
    }

    #[test]
    fn not_a_zip_is_an_archive_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"this is not a zip").unwrap();
        assert!(matches!(read_entries(file.path(), &ExtractParams::default(), |_| true), Err(ArchiveError::Invalid(_))));
        assert!(matches!(
            read_entries(Path::new("/nonexistent/x.zip"), &ExtractParams::default(), |_| true),
            Err(ArchiveError::Io(_))
        ));
    }
}
