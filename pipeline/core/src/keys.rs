//! Deterministic names: object keys, image ids, batch ids and `Nats-Msg-Id`s.
//!
//! Redelivery reruns a stage on the same input; because every name below is a
//! pure function of that input, a rerun overwrites the same objects and
//! publishes the same message ids (which JetStream then drops as duplicates).
//!
//! Object layout:
//! ```text
//! uploads/<batch>.zip                         ZIPs put there by `pipeline submit` and the API
//! batches/<batch>/originals/<image>.<ext>     one original per ZIP image entry
//! batches/<batch>/crops/<image>-<n>.jpg       crop of the n-th face (in detection order)
//! ```

use sha2::{Digest, Sha256};

/// Image id of the `index`-th image of a batch (0-based): the `index`-th image entry
/// of a ZIP in central-directory order (other entries are skipped and not counted),
/// or the `index`-th URL of a list. A batch's ids are therefore dense, `image_id(0)`
/// to `image_id(count - 1)`, which lets a results page find its start by key.
pub fn image_id(index: usize) -> String {
    format!("{index:07}")
}

/// Key of an original; the extension is the entry's, lower-cased, when it is a plain token.
pub fn original_key(batch_id: &str, image_id: &str, entry_name: &str) -> String {
    let ext = extension(entry_name).unwrap_or_else(|| "bin".into());
    format!("batches/{batch_id}/originals/{image_id}.{ext}")
}

/// Key of the crop of the `face`-th face of an image.
pub fn crop_key(batch_id: &str, image_id: &str, face: usize) -> String {
    format!("batches/{batch_id}/crops/{image_id}-{face}.jpg")
}

/// Prefix of a batch's crops.
pub fn crops_prefix(batch_id: &str) -> String {
    format!("{}crops/", batch_prefix(batch_id))
}

/// Where an uploaded ZIP waits for extract: `uploads/<batch>.zip`.
pub fn upload_key(batch_id: &str) -> String {
    format!("uploads/{batch_id}.zip")
}

/// A crop's object key from its file name (`<image>-<face>.jpg`), as the API serves it.
pub fn crop_key_of(batch_id: &str, file_name: &str) -> String {
    format!("{}crops/{file_name}", batch_prefix(batch_id))
}

/// Prefix under which all objects of a batch live.
pub fn batch_prefix(batch_id: &str) -> String {
    format!("batches/{batch_id}/")
}

/// Lower-cased extension of a file name, when it is short and alphanumeric.
pub fn extension(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let (stem, ext) = base.rsplit_once('.')?;
    (!stem.is_empty() && (1..=5).contains(&ext.len()) && ext.chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| ext.to_ascii_lowercase())
}

/// What a message is: the first part of its `Nats-Msg-Id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A batch's extract job (`submit:<batch>:job`).
    ExtractJob,
    /// An image's detect job.
    DetectJob,
    /// An image's crop job.
    CropJob,
    /// An image's outcome, for persist.
    Outcome,
    /// An image's failure, for persist (its id also names the failed message).
    Failure,
}

impl MessageKind {
    /// The id's first part, as it has always been spelled.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExtractJob => "submit",
            Self::DetectJob => "detect",
            Self::CropJob => "crop",
            Self::Outcome => "persist",
            Self::Failure => "failed",
        }
    }
}

/// `Nats-Msg-Id` of a message of `kind` about one image (or, for a job, one batch).
pub fn msg_id(kind: MessageKind, batch_id: &str, image_id: &str) -> String {
    format!("{}:{batch_id}:{image_id}", kind.as_str())
}

/// `Nats-Msg-Id` of a message of `kind` about `image`: [`msg_id`], and, once the
/// reconciler has re-driven the image, `:r<n>` (a fresh id for every re-drive, so
/// JetStream's duplicate window never drops a re-driven message as a duplicate of one
/// the broker lost).
pub fn image_msg_id(kind: MessageKind, image: &crate::messages::ImageRef) -> String {
    redriven(msg_id(kind, &image.batch_id, &image.image_id), image.redrive)
}

/// `Nats-Msg-Id` of a batch's extract job, `submit:<batch>:job`, with `:r<n>` once re-driven.
pub fn job_msg_id(batch_id: &str, redrive: u32) -> String {
    redriven(msg_id(MessageKind::ExtractJob, batch_id, "job"), redrive)
}

fn redriven(id: String, redrive: u32) -> String {
    if redrive == 0 { id } else { format!("{id}:r{redrive}") }
}

/// `Nats-Msg-Id` of the dead letter of message `sequence` of `stream`: a message fails
/// for good once, however many replicas see it fail.
pub fn dead_letter_msg_id(stream: &str, sequence: u64) -> String {
    format!("dead:{stream}:{sequence}")
}

/// Batch id derived from the fields that identify one job message, so every
/// redelivery of that message names the same batch.
pub fn derived_batch_id(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("b-{hex}")
}

/// A new batch id for a submission (CLI or API): derived from its project, its
/// source and the current time, so two submissions of one file are two batches.
pub fn new_batch_id(project_id: &str, source: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let salt: u64 = rand::random();
    derived_batch_id(&[project_id, source, &now.to_string(), &salt.to_string()])
}

/// True when `id` is safe inside an object key and a subject token: letters, digits, `-`, `_`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(image_id(42), "0000042");
        assert_eq!(original_key("b-1", "0000042", "dir/Photo.JPG"), "batches/b-1/originals/0000042.jpg");
        assert_eq!(original_key("b-1", "7", "noext"), "batches/b-1/originals/7.bin");
        assert_eq!(original_key("b-1", "7", "../../etc/passwd"), "batches/b-1/originals/7.bin");
        assert_eq!(crop_key("b-1", "0000042", 0), "batches/b-1/crops/0000042-0.jpg");
        assert!(crop_key("b", "i", 0).starts_with(&batch_prefix("b")));
        assert_eq!(msg_id(MessageKind::DetectJob, "b-1", "0000042"), "detect:b-1:0000042");
        let mut image = crate::messages::ImageRef::new("b-1", "0000042", crate::domain::Priority::DEFAULT);
        assert_eq!(image_msg_id(MessageKind::CropJob, &image), "crop:b-1:0000042");
        image.redrive = 2;
        assert_eq!(image_msg_id(MessageKind::CropJob, &image), "crop:b-1:0000042:r2", "a re-drive is never a duplicate");
        assert_eq!(job_msg_id("b-1", 0), "submit:b-1:job");
        assert_eq!(job_msg_id("b-1", 1), "submit:b-1:job:r1");
    }

    #[test]
    fn extensions() {
        assert_eq!(extension("a/b/c.JPeG").as_deref(), Some("jpeg"));
        assert_eq!(extension(".hidden"), None);
        assert_eq!(extension("x.tar.gz").as_deref(), Some("gz"));
        assert_eq!(extension("x.j p g"), None);
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_batch_id(&["proj", "uploads/a.zip", "17"]);
        assert_eq!(a, derived_batch_id(&["proj", "uploads/a.zip", "17"]));
        assert_ne!(a, derived_batch_id(&["proj", "uploads/a.zip", "18"]));
        // Separators keep ("ab","c") and ("a","bc") apart.
        assert_ne!(derived_batch_id(&["ab", "c"]), derived_batch_id(&["a", "bc"]));
        assert!(is_valid_id(&a));
        assert!(!is_valid_id("../x"));
        assert!(!is_valid_id(""));
    }
}
