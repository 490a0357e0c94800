//! The JSON messages that travel between stages.
//!
//! Messages carry object-store keys, never image bytes. Unknown fields are
//! ignored so older stages tolerate newer producers; a missing required field
//! is a [`MessageError`], which the runtime treats as permanent (dead letter).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::domain::{Detector, ImageStatus, Priority, StageName};

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct MessageError(#[from] serde_json::Error);

impl crate::error::Classify for MessageError {
    /// A message that does not parse never will.
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Permanent
    }
}

/// Decodes a message payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, MessageError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Encodes a message payload.
pub fn encode<T: Serialize>(msg: &T) -> bytes::Bytes {
    serde_json::to_vec(msg)
        .expect("messages are plain data and always serialize")
        .into()
}

/// Input of `extract`: one ZIP to unpack, or a list of image URLs to download, into a batch.
///
/// `{"project_id": "proj-123", "priority": 5, "zip": "uploads/photos.zip"}` or
/// `{"project_id": "proj-123", "images": [{"record_id": "r1", "url": "https://host/a.jpg"}]}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExtractJob {
    /// Batch id; when absent one is derived from the job message itself, so a
    /// redelivered job lands in the same batch.
    #[serde(default)]
    pub batch_id: Option<String>,
    /// Owner of the batch, recorded with it.
    pub project_id: String,
    /// 1 (lowest) to 10 (highest), 5 when absent: picks the band of every stage the batch passes.
    #[serde(default)]
    pub priority: Priority,
    /// The ZIP: an object-store key (`uploads/x.zip`), or a local path
    /// (`/data/x.zip` or `file:///data/x.zip`) readable by the extract process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zip: Option<String>,
    /// Images to download instead of a ZIP; image `n` of the list gets image id `n`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<RemoteImage>,
    /// How many times the reconciler has published this job again (its message id
    /// changes with it, so JetStream's duplicate window does not drop the new one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redrive: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One image of an [`ExtractJob`] given by URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteImage {
    /// The caller's own id for the image, kept on its outcome.
    #[serde(default)]
    pub record_id: Option<String>,
    /// `http` or `https` URL of the image.
    pub url: String,
}

/// Where an [`ExtractJob`]'s images come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExtractSource<'a> {
    /// A ZIP archive (object-store key or local path).
    Zip(&'a str),
    /// Image URLs.
    Urls(&'a [RemoteImage]),
}

impl ExtractJob {
    /// A job unpacking the ZIP at `zip` into batch `batch_id`.
    pub fn for_zip(batch_id: Option<String>, project_id: String, priority: Priority, zip: String) -> Self {
        Self { batch_id, project_id, priority, zip: Some(zip), images: Vec::new(), redrive: 0 }
    }

    /// The job's one source, or why it has none or two.
    pub fn source(&self) -> Result<ExtractSource<'_>, String> {
        match (&self.zip, self.images.is_empty()) {
            (Some(zip), true) => Ok(ExtractSource::Zip(zip)),
            (None, false) => Ok(ExtractSource::Urls(&self.images)),
            (Some(_), false) => Err("a job has either `zip` or `images`, not both".into()),
            (None, true) => Err("a job needs `zip` (an archive) or `images` (a non-empty URL list)".into()),
        }
    }

    /// A short description of the source, recorded with the batch.
    pub fn describe_source(&self) -> String {
        match self.source() {
            Ok(ExtractSource::Zip(zip)) => zip.to_string(),
            Ok(ExtractSource::Urls(urls)) => format!("{} image URL(s)", urls.len()),
            Err(_) => "no source".to_string(),
        }
    }
}

/// What identifies an image wherever it travels; embedded in every per-image message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRef {
    /// Batch the image belongs to.
    pub batch_id: String,
    /// Image id, unique within the batch and stable across redeliveries.
    pub image_id: String,
    /// The batch's priority, 1-10: picks the band subject of every stage it passes.
    #[serde(default)]
    pub priority: Priority,
    /// How many times the reconciler has published this image's job again; every
    /// message id of the image's way through the stages carries it (see
    /// [`crate::keys::image_msg_id`]), so none is dropped as a duplicate of one the
    /// broker lost. Object keys do not carry it: a re-driven image overwrites the same crops.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redrive: u32,
}

impl ImageRef {
    /// The image `image_id` of `batch_id`, at `priority`, as extract first sends it.
    pub fn new(batch_id: impl Into<String>, image_id: impl Into<String>, priority: Priority) -> Self {
        Self { batch_id: batch_id.into(), image_id: image_id.into(), priority, redrive: 0 }
    }
}

/// The ids any message may carry, read leniently (every field optional) so logs
/// and dead letters can name the batch and image even of a malformed message.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessageIds {
    /// Batch id, when the payload has one.
    #[serde(default)]
    pub batch_id: Option<String>,
    /// Image id, when the payload has one.
    #[serde(default)]
    pub image_id: Option<String>,
}

impl MessageIds {
    /// Reads the ids from any payload; empty when it is not a JSON object.
    pub fn read(payload: &[u8]) -> Self {
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

/// Input of `detect`: one original in the object store.
///
/// `{"batch_id": "b-1", "image_id": "000001", "key": "batches/b-1/originals/000001.jpg"}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetectJob {
    /// The image.
    #[serde(flatten)]
    pub image: ImageRef,
    /// Object key of the original.
    pub key: String,
}

/// A face box in original-image pixels (after EXIF orientation), with the detector's score.
///
/// `{"x": 600, "y": 300, "w": 200, "h": 240, "score": 0.93,
///   "landmarks": [[655, 390], [745, 392], [700, 440], [662, 490], [738, 491]]}`
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct FaceBox {
    /// Left edge.
    pub x: f32,
    /// Top edge.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
    /// Detector confidence in [0, 1].
    pub score: f32,
    /// Five landmarks, from YuNet and RetinaFace (Haar gives none). Absent from
    /// messages written before landmarks existed, and then simply not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landmarks: Option<Landmarks>,
}

impl FaceBox {
    /// A box without landmarks.
    pub fn new(x: f32, y: f32, w: f32, h: f32, score: f32) -> Self {
        Self { x, y, w, h, score, landmarks: None }
    }

    /// Area in square pixels.
    pub fn area(&self) -> f32 {
        self.w * self.h
    }
}

/// Five facial landmarks `[x, y]` in the same pixels as their box, in the order
/// YuNet and RetinaFace both give them for an upright face: the eye on the image's
/// left (the person's right eye), the other eye, the nose tip, the mouth corner on
/// the image's left, the other mouth corner.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Landmarks(pub [[f32; 2]; 5]);

impl Landmarks {
    /// The angle of the line from the first eye to the second, in degrees,
    /// clockwise on screen (image y grows downwards): 0 when the eyes are level,
    /// positive when the face is turned clockwise.
    pub fn eye_angle(&self) -> f64 {
        let [[x0, y0], [x1, y1], ..] = self.0;
        ((y1 - y0) as f64).atan2((x1 - x0) as f64).to_degrees()
    }

    /// Every point mapped through `f`.
    pub fn map(self, f: impl Fn([f32; 2]) -> [f32; 2]) -> Self {
        Self(self.0.map(f))
    }
}

/// Input of `crop`: an original and the faces found in it.
///
/// `{"batch_id": "b-1", "image_id": "000001", "key": "batches/b-1/originals/000001.jpg",
///   "width": 1600, "height": 1200, "faces": [{"x": 600, "y": 300, "w": 200, "h": 240, "score": 0.93}]}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CropJob {
    /// The image.
    #[serde(flatten)]
    pub image: ImageRef,
    /// Object key of the original.
    pub key: String,
    /// Width of the upright original in pixels.
    pub width: u32,
    /// Height of the upright original in pixels.
    pub height: u32,
    /// Faces found, in original pixels.
    pub faces: Vec<FaceBox>,
    /// Which detector decided them: `yunet`, `retinaface` (detect's second pass) or `haar`.
    #[serde(default)]
    pub detector: Option<Detector>,
}

/// Input of `persist`: an image's outcome.
///
/// `{"batch_id": "b-1", "image_id": "000001", "status": "cropped", "faces": [...],
///   "crop_keys": ["batches/b-1/crops/000001-0.jpg"], "attempts": 1}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    /// The image.
    #[serde(flatten)]
    pub image: ImageRef,
    /// What happened.
    pub status: ImageStatus,
    /// Width of the upright original, when it was read.
    #[serde(default)]
    pub width: Option<u32>,
    /// Height of the upright original, when it was read.
    #[serde(default)]
    pub height: Option<u32>,
    /// Faces found, in original pixels.
    #[serde(default)]
    pub faces: Vec<FaceBox>,
    /// Object keys of the crops, in the order of the faces they came from.
    #[serde(default)]
    pub crop_keys: Vec<String>,
    /// Why the image failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Stage at which it failed.
    #[serde(default)]
    pub failed_stage: Option<StageName>,
    /// Delivery attempts of the message that produced this outcome.
    #[serde(default = "one")]
    pub attempts: u32,
    /// Detector that produced the faces.
    #[serde(default)]
    pub detector: Option<Detector>,
}

fn one() -> u32 {
    1
}

impl Outcome {
    /// The outcome of an image that failed for good at `stage`.
    pub fn failed(image: ImageRef, stage: StageName, error: String, attempts: u32) -> Self {
        Self {
            image,
            status: ImageStatus::Failed,
            width: None,
            height: None,
            faces: Vec::new(),
            crop_keys: Vec::new(),
            error: Some(error),
            failed_stage: Some(stage),
            attempts,
            detector: None,
        }
    }
}

/// A message that failed for good, as stored on the dead-letter stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    /// Stage that gave up.
    pub stage: String,
    /// Subject the message was consumed from (replay publishes it there).
    pub subject: String,
    /// The original payload, as text (lossy if it was not UTF-8).
    pub payload: String,
    /// Why it failed.
    pub error: String,
    /// Whether the error was permanent (true) or retries ran out (false).
    pub permanent: bool,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Batch, when the payload named one.
    #[serde(default)]
    pub batch_id: Option<String>,
    /// Image, when the payload named one.
    #[serde(default)]
    pub image_id: Option<String>,
    /// When the stage gave up (RFC 3339).
    pub time: chrono::DateTime<chrono::Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_job_defaults_and_ignores_unknown_fields() {
        let job: ExtractJob =
            decode(br#"{"project_id":"proj-123","zip":"uploads/a.zip","color":"blue"}"#).unwrap();
        assert_eq!(job.priority, Priority::DEFAULT);
        assert_eq!(job.batch_id, None);
        assert_eq!(job.source(), Ok(ExtractSource::Zip("uploads/a.zip")));
    }

    #[test]
    fn extract_job_has_exactly_one_source() {
        let urls: ExtractJob =
            decode(br#"{"project_id":"p","images":[{"record_id":"r1","url":"http://h/a.jpg"},{"url":"http://h/b"}]}"#)
                .unwrap();
        let Ok(ExtractSource::Urls(images)) = urls.source() else { panic!("{urls:?}") };
        assert_eq!(images[0].record_id.as_deref(), Some("r1"));
        assert_eq!(images[1].record_id, None);
        let neither: ExtractJob = decode(br#"{"project_id":"p"}"#).unwrap();
        assert!(neither.source().unwrap_err().contains("zip"));
        let both: ExtractJob = decode(br#"{"project_id":"p","zip":"z","images":[{"url":"http://h/a"}]}"#).unwrap();
        assert!(both.source().is_err());
        // A ZIP job is encoded without an empty image list, as before URL jobs existed.
        let zip = ExtractJob::for_zip(None, "p".into(), Priority::DEFAULT, "z".into());
        assert_eq!(String::from_utf8(encode(&zip).to_vec()).unwrap(), r#"{"batch_id":null,"project_id":"p","priority":5,"zip":"z"}"#);
    }

    #[test]
    fn missing_field_is_an_error_naming_it() {
        let err = decode::<ExtractJob>(br#"{"priority":3}"#).unwrap_err();
        assert!(err.to_string().contains("project_id"), "{err}");
        let err = decode::<DetectJob>(br#"{"batch_id":"b","key":"k"}"#).unwrap_err();
        assert!(err.to_string().contains("image_id"), "{err}");
        assert!(decode::<DetectJob>(b"not json").is_err());
        assert!(decode::<CropJob>(br#"{"batch_id":"b","image_id":"1","key":"k","width":"wide","height":1,"faces":[]}"#).is_err());
    }

    #[test]
    fn messages_round_trip_flat() {
        let job = CropJob {
            image: ImageRef::new("b", "000001", Priority::DEFAULT),
            key: "batches/b/originals/000001.jpg".into(),
            width: 10,
            height: 20,
            faces: vec![FaceBox { landmarks: Some(Landmarks([[1.5, 2.5], [3.0, 2.5], [2.2, 3.5], [1.6, 4.5], [2.9, 4.5]])), ..FaceBox::new(1.0, 2.0, 3.0, 4.0, 0.9) }],
            detector: Some(Detector::Yunet),
        };
        let bytes = encode(&job);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(r#""batch_id":"b""#), "flattened: {text}");
        assert_eq!(decode::<CropJob>(&bytes).unwrap(), job);
        // Every per-image message yields its ImageRef, which failure recording relies on.
        assert_eq!(decode::<ImageRef>(&bytes).unwrap(), job.image);
    }

    #[test]
    fn landmarks_are_optional_pairs_and_give_the_eye_angle() {
        // A box written before landmarks existed still reads, and writes back without them.
        let old: FaceBox = serde_json::from_str(r#"{"x":1,"y":2,"w":3,"h":4,"score":0.5}"#).unwrap();
        assert_eq!(old, FaceBox::new(1.0, 2.0, 3.0, 4.0, 0.5));
        assert!(!serde_json::to_string(&old).unwrap().contains("landmarks"));
        let with: FaceBox =
            serde_json::from_str(r#"{"x":1,"y":2,"w":3,"h":4,"score":0.5,"landmarks":[[0,0],[10,10],[5,5],[2,8],[8,8]]}"#).unwrap();
        let eyes = with.landmarks.expect("read");
        assert!((eyes.eye_angle() - 45.0).abs() < 1e-9, "clockwise on screen is positive");
        assert!((Landmarks([[10.0, 0.0], [0.0, 0.0], [0.0; 2], [0.0; 2], [0.0; 2]]).eye_angle().abs() - 180.0).abs() < 1e-9);
        // Not five pairs: an error, not a guess.
        assert!(serde_json::from_str::<FaceBox>(r#"{"x":1,"y":2,"w":3,"h":4,"score":0.5,"landmarks":[[0,0]]}"#).is_err());
    }

    #[test]
    fn outcome_status_names() {
        let o: Outcome = decode(br#"{"batch_id":"b","image_id":"1","status":"no_face"}"#).unwrap();
        assert_eq!(o.status, ImageStatus::NoFace);
        assert_eq!(o.attempts, 1);
        assert_eq!(ImageStatus::Cropped.as_str(), "cropped");
    }
}
