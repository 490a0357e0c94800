//! Detection quality on labelled photos (`pipeline eval`), with the detect
//! stage's own code and settings.
//!
//! Scoring protocol (that of `shared/data/faces/README.md`):
//! - a labelled face that is flagged invalid or whose smaller side is under
//!   20 px is "ignore": missing it is no error, and a detection overlapping it
//!   (IoU >= 0.3) is not a false positive;
//! - detections whose smaller side is under 15 px are dropped;
//! - detections are matched greedily by descending score at IoU >= 0.5;
//!   precision = matched / detections, recall = matched / countable faces,
//!   over every photo with boxes (a photo labelled with no face makes every
//!   detection on it a false positive);
//! - photos with only a known face count report the share whose detection
//!   count equals it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use facepipe_core::messages::FaceBox;
use facepipe_core::topology::DetectParams;
use facepipe_vision::detect;

/// Labelled faces smaller than this (smaller side, px) are "ignore".
pub const MIN_COUNTABLE_FACE: f32 = 20.0;
/// Detections smaller than this (smaller side, px) are dropped.
pub const MIN_DETECTION: f32 = 15.0;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The manifest or a photo could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest is not the expected JSON.
    #[error("manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    /// Detection failed on a photo.
    #[error("{file}: {source}")]
    Detect {
        /// Photo.
        file: String,
        /// Why.
        source: facepipe_vision::VisionError,
    },
}

/// One manifest record.
#[derive(Debug, Clone, Deserialize)]
pub struct Labelled {
    /// Path relative to the manifest's folder.
    pub file: String,
    /// `[[x, y, w, h], ...]`; `[]` for no face; absent when only a count is known.
    pub faces: Option<Vec<[f32; 4]>>,
    /// Known number of faces.
    #[serde(default)]
    pub face_count_known: Option<usize>,
    /// WIDER attributes per face; index 3 is `invalid`.
    #[serde(default)]
    pub wider_attrs: Option<Vec<Vec<u8>>>,
}

impl Labelled {
    /// The first folder of the path: where the photo came from.
    pub fn source(&self) -> &str {
        self.file.split('/').next().unwrap_or("")
    }
}

/// Counts for one photo or a set of photos.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    /// Photos scored.
    pub images: usize,
    /// Countable labelled faces.
    pub faces: usize,
    /// Detections matched to a countable face.
    pub true_positives: usize,
    /// Detections matching nothing (and not overlapping an ignored face).
    pub false_positives: usize,
    /// Count-only photos seen.
    pub count_images: usize,
    /// Of those, photos whose detection count equals the known count.
    pub count_correct: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.images += other.images;
        self.faces += other.faces;
        self.true_positives += other.true_positives;
        self.false_positives += other.false_positives;
        self.count_images += other.count_images;
        self.count_correct += other.count_correct;
    }

    /// Matched / detections (1 when nothing was detected).
    pub fn precision(&self) -> f64 {
        let d = self.true_positives + self.false_positives;
        if d == 0 { 1.0 } else { self.true_positives as f64 / d as f64 }
    }

    /// Matched / countable faces (1 when there were none).
    pub fn recall(&self) -> f64 {
        if self.faces == 0 { 1.0 } else { self.true_positives as f64 / self.faces as f64 }
    }

    /// Harmonic mean of precision and recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) }
    }

    /// Share of count-only photos with the right number of detections.
    pub fn count_accuracy(&self) -> Option<f64> {
        (self.count_images > 0).then(|| self.count_correct as f64 / self.count_images as f64)
    }
}

/// Intersection over union of two `[x, y, w, h]` boxes.
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let (x0, y0) = (a[0].max(b[0]), a[1].max(b[1]));
    let (x1, y1) = ((a[0] + a[2]).min(b[0] + b[2]), (a[1] + a[3]).min(b[1] + b[3]));
    let inter = (x1 - x0).max(0.0) * (y1 - y0).max(0.0);
    let union = a[2] * a[3] + b[2] * b[3] - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Scores one photo's detections against its labels.
pub fn score(label: &Labelled, detections: &[FaceBox]) -> Tally {
    score_by_size(label, detections).0
}

/// Upper bounds (exclusive) of the face-size buckets recall is reported in: the labelled
/// box's smaller side, in original pixels. The last bucket has no bound.
pub const SIZE_BUCKETS: [f32; 6] = [24.0, 28.0, 32.0, 64.0, 128.0, f32::INFINITY];

/// Countable faces, and those found, in one face-size bucket.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct SizeTally {
    /// Countable labelled faces of this size.
    pub faces: usize,
    /// Of those, faces a detection matched.
    pub found: usize,
}

impl SizeTally {
    /// Found / faces (1 when there were none).
    pub fn recall(&self) -> f64 {
        if self.faces == 0 { 1.0 } else { self.found as f64 / self.faces as f64 }
    }
}

/// The index in [`SIZE_BUCKETS`] of a face whose smaller side is `side`.
fn bucket(side: f32) -> usize {
    SIZE_BUCKETS.iter().position(|upper| side < *upper).unwrap_or(SIZE_BUCKETS.len() - 1)
}

/// [`score`], with the countable faces and those found, by size bucket.
pub fn score_by_size(label: &Labelled, detections: &[FaceBox]) -> (Tally, [SizeTally; SIZE_BUCKETS.len()]) {
    let mut sizes = [SizeTally::default(); SIZE_BUCKETS.len()];
    let mut dets: Vec<&FaceBox> = detections.iter().filter(|d| d.w.min(d.h) >= MIN_DETECTION).collect();
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let Some(faces) = &label.faces else {
        let known = label.face_count_known;
        let tally = Tally {
            count_images: usize::from(known.is_some()),
            count_correct: usize::from(known == Some(dets.len())),
            ..Tally::default()
        };
        return (tally, sizes);
    };
    let ignored = |i: usize| {
        let invalid = label.wider_attrs.as_ref().and_then(|a| a.get(i)).and_then(|a| a.get(3)) == Some(&1);
        invalid || faces[i][2].min(faces[i][3]) < MIN_COUNTABLE_FACE
    };
    let mut tally = Tally { images: 1, faces: (0..faces.len()).filter(|i| !ignored(*i)).count(), ..Tally::default() };
    let mut matched = vec![false; faces.len()];
    for d in dets {
        let b = [d.x, d.y, d.w, d.h];
        let best = (0..faces.len())
            .filter(|&i| !ignored(i) && !matched[i])
            .map(|i| (i, iou(b, faces[i])))
            .filter(|(_, v)| *v >= 0.5)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, _)) = best {
            matched[i] = true;
            tally.true_positives += 1;
        } else if !(0..faces.len()).any(|i| ignored(i) && iou(b, faces[i]) >= 0.3) {
            tally.false_positives += 1;
        }
    }
    for (i, face) in faces.iter().enumerate().filter(|(i, _)| !ignored(*i)) {
        let size = &mut sizes[bucket(face[2].min(face[3]))];
        size.faces += 1;
        size.found += usize::from(matched[i]);
    }
    (tally, sizes)
}

/// Results of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Totals over every photo.
    pub total: Tally,
    /// Totals per source folder.
    pub by_source: BTreeMap<String, Tally>,
    /// Mean wall milliseconds per photo for decode + detect, one thread.
    pub ms_per_image: f64,
    /// First detector actually used (`yunet`, or `haar` after a fallback).
    pub detector: String,
    /// What ran it (`onnxruntime`, or `opencv` by choice or after a fallback).
    pub engine: String,
    /// File name of the model (or Haar cascade) that ran.
    pub model: String,
    /// Score threshold applied to the detector's boxes.
    pub score_threshold: f32,
    /// File name of the second pass's model, when it ran (see `DetectParams::second_pass`).
    pub second_pass: Option<String>,
    /// Photos whose boxes the second pass decided (YuNet was unsure of them).
    pub second_pass_images: usize,
    /// Photos evaluated.
    pub images: usize,
    /// Recall by face size: one entry per [`SIZE_BUCKETS`] bound.
    pub by_size: Vec<SizeTally>,
    /// This process's peak resident memory in MiB (`VmHWM`): one thread detecting, as a
    /// detect process with one worker would.
    pub peak_rss_mib: f64,
}

/// Runs the detect stage's code over every photo of a manifest.
pub fn evaluate(manifest: &Path, params: &DetectParams) -> Result<Report, EvalError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| EvalError::Read { path: path.to_owned(), source });
    let labels: Vec<Labelled> = serde_json::from_slice(&read(manifest)?)?;
    let root = manifest.parent().unwrap_or(Path::new("."));
    let running = detect::running(params).map_err(|source| EvalError::Detect { file: String::new(), source })?;
    let mut report = Report {
        total: Tally::default(),
        by_source: BTreeMap::new(),
        ms_per_image: 0.0,
        detector: running.detector.to_string(),
        engine: running.engine.to_string(),
        model: running.model,
        score_threshold: running.score_threshold,
        second_pass: running.second_pass,
        second_pass_images: 0,
        images: labels.len(),
        by_size: vec![SizeTally::default(); SIZE_BUCKETS.len()],
        peak_rss_mib: 0.0,
    };
    let mut elapsed = 0.0;
    for label in &labels {
        let bytes = read(&root.join(&label.file))?;
        let started = Instant::now();
        let found = detect::detect_faces(&bytes, params)
            .map_err(|source| EvalError::Detect { file: label.file.clone(), source })?;
        elapsed += started.elapsed().as_secs_f64();
        report.second_pass_images += usize::from(found.detector == facepipe_core::domain::Detector::Retinaface);
        let (tally, sizes) = score_by_size(label, &found.faces);
        for (total, size) in report.by_size.iter_mut().zip(sizes) {
            total.faces += size.faces;
            total.found += size.found;
        }
        report.total.add(&tally);
        report.by_source.entry(label.source().to_string()).or_default().add(&tally);
    }
    report.ms_per_image = elapsed * 1000.0 / labels.len().max(1) as f64;
    report.peak_rss_mib = peak_rss_mib();
    Ok(report)
}

/// This process's `VmHWM` in MiB (0 where `/proc` does not say).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(faces: Option<Vec<[f32; 4]>>, count: Option<usize>) -> Labelled {
        Labelled { file: "src/x.jpg".into(), faces, face_count_known: count, wider_attrs: None }
    }

    fn det(x: f32, y: f32, w: f32, h: f32, score: f32) -> FaceBox {
        FaceBox::new(x, y, w, h, score)
    }

    #[test]
    fn greedy_matching_by_score() {
        let l = label(Some(vec![[0.0, 0.0, 100.0, 100.0], [200.0, 0.0, 100.0, 100.0]]), None);
        // Two detections on the first face: the higher score matches, the other is a false positive.
        let t = score(&l, &[det(5.0, 5.0, 100.0, 100.0, 0.7), det(0.0, 0.0, 100.0, 100.0, 0.9)]);
        assert_eq!((t.faces, t.true_positives, t.false_positives), (2, 1, 1));
        assert_eq!(t.recall(), 0.5);
        assert_eq!(t.precision(), 0.5);
    }

    #[test]
    fn ignored_faces_and_tiny_detections() {
        let mut l = label(Some(vec![[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 50.0, 50.0]]), None);
        l.wider_attrs = Some(vec![vec![0, 0, 0, 0, 0, 0], vec![0, 0, 0, 1, 0, 0]]);
        // Both faces are ignored (tiny; invalid): detections on them are neither TP nor FP.
        let t = score(&l, &[det(0.0, 0.0, 16.0, 16.0, 0.9), det(100.0, 100.0, 50.0, 50.0, 0.9), det(300.0, 300.0, 10.0, 10.0, 0.9)]);
        assert_eq!((t.faces, t.true_positives, t.false_positives), (0, 0, 0));
    }

    #[test]
    fn no_face_photos_and_count_only_photos() {
        let t = score(&label(Some(vec![]), None), &[det(0.0, 0.0, 50.0, 50.0, 0.9)]);
        assert_eq!((t.images, t.false_positives), (1, 1));
        let t = score(&label(None, Some(2)), &[det(0.0, 0.0, 50.0, 50.0, 0.9), det(99.0, 0.0, 50.0, 50.0, 0.8)]);
        assert_eq!((t.count_images, t.count_correct), (1, 1));
        let t = score(&label(None, Some(1)), &[]);
        assert_eq!((t.count_images, t.count_correct, t.images), (1, 0, 0));
    }

    #[test]
    fn recall_by_face_size() {
        let faces = vec![[0.0, 0.0, 22.0, 30.0], [100.0, 0.0, 40.0, 40.0], [200.0, 0.0, 300.0, 200.0], [600.0, 0.0, 10.0, 10.0]];
        let (_, sizes) = score_by_size(&label(Some(faces), None), &[det(100.0, 0.0, 40.0, 40.0, 0.9), det(600.0, 0.0, 10.0, 10.0, 0.9)]);
        // 22 px: the first bucket, missed; 40 px: 32-64, found; 200 px: the last, missed;
        // the 10 px face is not countable and is in no bucket.
        assert_eq!(sizes[0], SizeTally { faces: 1, found: 0 });
        assert_eq!(sizes[3], SizeTally { faces: 1, found: 1 });
        assert_eq!(sizes[5], SizeTally { faces: 1, found: 0 });
        assert_eq!(sizes.iter().map(|s| s.faces).sum::<usize>(), 3);
    }
}
