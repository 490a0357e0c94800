//! The domain values that cross crates, as types: a stage's name, an image's
//! and a batch's status, a batch's priority, and the detector that decided an
//! image. Each has one spelling on the wire and in PostgreSQL.

use serde::{Deserialize, Serialize};

/// Identifies a stage; used for stream names, metrics labels and dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageName {
    /// ZIP -> originals.
    Extract,
    /// Original -> face boxes.
    Detect,
    /// Face boxes -> crops.
    Crop,
    /// Outcome -> PostgreSQL.
    Persist,
}

impl StageName {
    /// All stages in flow order.
    pub const ALL: [StageName; 4] = [Self::Extract, Self::Detect, Self::Crop, Self::Persist];

    /// The stage this one's output goes to; none after persist.
    pub fn next(self) -> Option<StageName> {
        match self {
            Self::Extract => Some(Self::Detect),
            Self::Detect => Some(Self::Crop),
            Self::Crop => Some(Self::Persist),
            Self::Persist => None,
        }
    }

    /// Lower-case name, as in the topology and the binary's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Extract => "extract",
            Self::Detect => "detect",
            Self::Crop => "crop",
            Self::Persist => "persist",
        }
    }
}

/// State of one image: `pending` until its outcome is recorded, then final.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// Registered by extract; its outcome is not recorded yet.
    Pending,
    /// At least one face was cropped.
    Cropped,
    /// The image was read and holds no face.
    NoFace,
    /// The image could not be processed; `error` says why.
    Failed,
}

impl ImageStatus {
    /// The value stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Cropped => "cropped",
            Self::NoFace => "no_face",
            Self::Failed => "failed",
        }
    }

    /// All states, for parsing.
    pub const ALL: [ImageStatus; 4] = [Self::Pending, Self::Cropped, Self::NoFace, Self::Failed];

    /// True once the image's outcome is recorded.
    pub fn is_final(self) -> bool {
        self != Self::Pending
    }
}

/// State of one batch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// Extract is storing and registering its images.
    Ingesting,
    /// Every image is registered; outcomes are being recorded.
    Processing,
    /// Every image has an outcome.
    Completed,
    /// The batch could not be read (an unreadable archive, for example).
    Failed,
}

impl BatchStatus {
    /// All states, for parsing.
    pub const ALL: [BatchStatus; 4] = [Self::Ingesting, Self::Processing, Self::Completed, Self::Failed];

    /// The value stored in PostgreSQL and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingesting => "ingesting",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// True when nothing more will happen to the batch (unless its failures are replayed).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// Which detector decided an image's faces.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    /// YuNet, on ONNX Runtime or OpenCV's DNN module.
    Yunet,
    /// RetinaFace, detect's second pass on photos YuNet is unsure of.
    Retinaface,
    /// OpenCV's Haar cascade, where the topology names it.
    Haar,
}

impl Detector {
    /// All detectors, for parsing.
    pub const ALL: [Detector; 3] = [Self::Yunet, Self::Retinaface, Self::Haar];

    /// The name on the wire, in PostgreSQL and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Yunet => "yunet",
            Self::Retinaface => "retinaface",
            Self::Haar => "haar",
        }
    }
}

/// The wire name as `Display`, and parsing it back with `FromStr`. Values compare
/// with values (`status == BatchStatus::Completed`), never with their spelling.
macro_rules! wire_name {
    ($($t:ty: $what:literal),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $t {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_one(&Self::ALL, Self::as_str, $what, s)
            }
        }
    )*};
}
wire_name!(ImageStatus: "image status", BatchStatus: "batch status", Detector: "detector", StageName: "stage");

/// A batch's priority: 1 (lowest) to 10 (highest), [`Priority::DEFAULT`] when none is given.
///
/// Validated once, where it enters (a message, the CLI, the API); every value of
/// this type is in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// The lowest priority.
    pub const MIN: Priority = Priority(1);
    /// The highest priority.
    pub const MAX: Priority = Priority(10);
    /// The priority of a batch that names none (the old design's default).
    pub const DEFAULT: Priority = Priority(5);

    /// `value` as a priority, if it is in 1..=10.
    pub fn new(value: i64) -> Result<Self, PriorityError> {
        if (i64::from(Self::MIN.0)..=i64::from(Self::MAX.0)).contains(&value) {
            Ok(Self(value as u8))
        } else {
            Err(PriorityError(value.to_string()))
        }
    }

    /// The number, 1..=10.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<i64> for Priority {
    type Error = PriorityError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Priority {
    type Err = PriorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse::<i64>().map_err(|_| PriorityError(s.to_string())).and_then(Self::new)
    }
}

/// A priority outside 1..=10, or not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority must be an integer from 1 to 10, not {0}")]
pub struct PriorityError(String);

/// A name that is not one of a type's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
}

fn parse_one<T: Copy>(all: &[T], name: fn(T) -> &'static str, what: &'static str, s: &str) -> Result<T, UnknownValue> {
    all.iter().copied().find(|v| name(*v) == s).ok_or_else(|| UnknownValue { what, value: s.to_string() })
}



#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_checked_once_and_defaults_to_five() {
        assert_eq!(Priority::default().get(), 5);
        assert_eq!("10".parse::<Priority>().unwrap(), Priority::MAX);
        assert!("11".parse::<Priority>().is_err());
        assert!("0".parse::<Priority>().is_err());
        assert!(serde_json::from_str::<Priority>("11").unwrap_err().to_string().contains("from 1 to 10"));
        assert_eq!(serde_json::to_string(&Priority::new(7).unwrap()).unwrap(), "7");
    }

    #[test]
    fn every_name_round_trips_and_unknown_names_are_named() {
        for s in ImageStatus::ALL {
            assert_eq!(s.as_str().parse::<ImageStatus>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in BatchStatus::ALL {
            assert_eq!(s.as_str().parse::<BatchStatus>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for d in Detector::ALL {
            assert_eq!(d.as_str().parse::<Detector>().unwrap(), d);
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        let flow: Vec<_> = std::iter::successors(Some(StageName::Extract), |s| s.next()).collect();
        assert_eq!(flow, StageName::ALL, "next() walks the stages in flow order");
        for s in StageName::ALL {
            assert_eq!(s.as_str().parse::<StageName>().unwrap(), s);
        }
        assert_eq!("fast".parse::<Detector>().unwrap_err().to_string(), "unknown detector `fast`");
    }
}
