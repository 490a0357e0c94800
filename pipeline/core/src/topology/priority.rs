//! `[priority]`: how priorities 1-10 map onto bands, and each band's subjects and consumer.
//!
//! Every stage's input has, per band, a plain subject (`faces.detect`, `faces.detect.high`:
//! what a person publishes with `nats pub`) and a subject per batch
//! (`faces.detect.<band>.batch.<batch>`: what the pipeline itself publishes). The
//! stream's per-subject counts then tell, in one request, whether anything of a batch
//! is still queued or in flight at a stage, which the reconciler reads to tell a batch
//! that waits from one whose messages the broker lost.

use serde::{Deserialize, Serialize};

use super::{ensure, is_token, StageName, Topology, TopologyError};
use crate::domain::Priority;

/// Priorities 1-10 (10 highest) mapped onto a few bands. Each band is a subject
/// and a durable consumer per stage; workers pull from the bands in a weighted
/// round robin, so high priority goes first and low priority never starves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriorityConfig {
    /// Bands from the highest to the lowest; a priority belongs to the first band whose `min` it reaches.
    pub bands: Vec<PriorityBand>,
}

/// One band of priorities.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriorityBand {
    /// Name, used as the subject suffix and the consumer's name suffix.
    pub name: String,
    /// Lowest priority in the band.
    pub min: u8,
    /// Share of pulls the band gets while every band has work.
    pub weight: u32,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        let band = |name: &str, min, weight| PriorityBand { name: name.into(), min, weight };
        Self { bands: vec![band("high", 8, 6), band("normal", 4, 3), band("low", 1, 1)] }
    }
}

impl PriorityConfig {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        let bands = &self.bands;
        ensure(!bands.is_empty() && bands.len() <= 10, "priority.bands", "give 1 to 10 bands")?;
        let mut names = std::collections::HashSet::new();
        for (i, band) in bands.iter().enumerate() {
            let key = format!("priority.bands[{i}]");
            ensure(is_token(&band.name) && names.insert(band.name.as_str()), &key, "names must be unique and use letters, digits, '-' or '_'")?;
            ensure(band.name != BATCH_TOKEN, &key, "`batch` names the per-batch subjects; give the band another name")?;
            ensure(band.weight >= 1, &key, "weight must be at least 1 (a band with no pulls would starve)")?;
            ensure(
                (1..=10).contains(&band.min) && bands.get(i + 1).is_none_or(|next| next.min < band.min),
                &key,
                "`min` must be in 1-10 and decrease from band to band",
            )?;
        }
        ensure(bands[bands.len() - 1].min == 1, "priority.bands", "the last band must start at priority 1, so every priority has a band")
    }
}

/// The token that separates a band's per-batch subjects from its plain one.
const BATCH_TOKEN: &str = "batch";

/// Where one band of one stage's input lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageBand {
    /// Band name.
    pub name: String,
    /// Pull weight.
    pub weight: u32,
    /// Plain subject of the band, for messages published by hand: the stage's subject
    /// for the band holding the default priority (so `nats pub faces.detect ...` keeps
    /// working), else `<subject>.<band>`.
    pub subject: String,
    /// The stage's subject, under which the band's per-batch subjects are
    /// `<subject>.<band>.batch.<batch>`.
    stage_subject: String,
    /// Durable consumer: the stage's `durable` for the default band, else `<durable>-<band>`.
    pub durable: String,
}

impl StageBand {
    /// The subject the pipeline publishes a message of `batch_id` on: `<stage subject>.<band>.batch.<batch>`.
    pub fn batch_subject(&self, batch_id: &str) -> String {
        format!("{}.{}.{BATCH_TOKEN}.{batch_id}", self.stage_subject, self.name)
    }

    /// Every per-batch subject of the band: `<stage subject>.<band>.batch.*`.
    pub fn batch_subjects(&self) -> String {
        self.batch_subject("*")
    }

    /// What the band's consumer takes: its plain subject and its per-batch ones.
    pub fn filter_subjects(&self) -> Vec<String> {
        vec![self.subject.clone(), self.batch_subjects()]
    }
}

impl Topology {
    /// The band a priority belongs to.
    pub fn band_of(&self, priority: Priority) -> &PriorityBand {
        let bands = &self.priority.bands;
        bands.iter().find(|b| priority.get() >= b.min).unwrap_or(&bands[bands.len() - 1])
    }

    /// `subject` (a stage's input subject) for a message of `priority`: its band's plain subject.
    pub fn priority_subject(&self, subject: &str, priority: Priority) -> String {
        self.band_subject(subject, self.band_of(priority))
    }

    /// The subject of `stage`'s input for a message of `batch_id` at `priority`:
    /// its band's per-batch subject.
    pub fn batch_subject(&self, stage: StageName, priority: Priority, batch_id: &str) -> String {
        format!("{}.{}.{BATCH_TOKEN}.{batch_id}", self.stage(stage).subject, self.band_of(priority).name)
    }

    /// Every per-batch subject of `stage`'s input, all bands: `<subject>.*.batch.*`.
    pub fn batch_subjects(&self, stage: StageName) -> String {
        format!("{}.*.{BATCH_TOKEN}.*", self.stage(stage).subject)
    }

    /// The batch a per-batch subject of `stage` names, if it is one.
    pub fn batch_of_subject<'a>(&self, stage: StageName, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(self.stage(stage).subject)?.strip_prefix('.')?;
        let (_band, rest) = rest.split_once('.')?;
        rest.strip_prefix(BATCH_TOKEN)?.strip_prefix('.').filter(|b| !b.is_empty() && !b.contains('.'))
    }

    fn is_default_band(&self, band: &PriorityBand) -> bool {
        std::ptr::eq(band, self.band_of(Priority::DEFAULT))
    }

    fn band_subject(&self, subject: &str, band: &PriorityBand) -> String {
        if self.is_default_band(band) { subject.to_string() } else { format!("{subject}.{}", band.name) }
    }

    /// Every band of a stage's input, highest first.
    pub fn stage_bands(&self, stage: StageName) -> Vec<StageBand> {
        let s = self.stage(stage);
        self.priority
            .bands
            .iter()
            .map(|band| StageBand {
                name: band.name.clone(),
                weight: band.weight,
                subject: self.band_subject(s.subject, band),
                stage_subject: s.subject.to_string(),
                durable: if self.is_default_band(band) { s.durable.to_string() } else { format!("{}-{}", s.durable, band.name) },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::repo;

    #[test]
    fn priorities_map_onto_band_subjects_and_consumers() {
        let t = repo();
        assert_eq!(t.priority, PriorityConfig::default(), "the file spells out the defaults");
        let p = |n| Priority::new(n).unwrap();
        assert_eq!(t.priority_subject("faces.detect", p(10)), "faces.detect.high");
        assert_eq!(t.priority_subject("faces.detect", p(8)), "faces.detect.high");
        assert_eq!(t.priority_subject("faces.detect", p(5)), "faces.detect", "the default band keeps the plain subject");
        assert_eq!(t.priority_subject("faces.detect", p(4)), "faces.detect");
        assert_eq!(t.priority_subject("faces.detect", p(1)), "faces.detect.low");
        let bands = t.stage_bands(StageName::Detect);
        let durables: Vec<&str> = bands.iter().map(|b| b.durable.as_str()).collect();
        assert_eq!(durables, ["detect-high", "detect", "detect-low"]);
    }

    #[test]
    fn a_batch_has_a_subject_per_band_that_its_band_consumer_takes() {
        let t = repo();
        let p = |n| Priority::new(n).unwrap();
        assert_eq!(t.batch_subject(StageName::Detect, p(5), "b-1"), "faces.detect.normal.batch.b-1");
        assert_eq!(t.batch_subject(StageName::Crop, p(9), "b-1"), "faces.crop.high.batch.b-1");
        assert_eq!(t.batch_subjects(StageName::Persist), "faces.persist.*.batch.*");
        let bands = t.stage_bands(StageName::Detect);
        assert_eq!(bands[1].filter_subjects(), ["faces.detect", "faces.detect.normal.batch.*"]);
        assert_eq!(bands[0].batch_subject("b-2"), "faces.detect.high.batch.b-2");
        assert_eq!(t.batch_of_subject(StageName::Detect, "faces.detect.low.batch.b-3"), Some("b-3"));
        assert_eq!(t.batch_of_subject(StageName::Detect, "faces.detect.low"), None);
        assert_eq!(t.batch_of_subject(StageName::Detect, "faces.detect"), None);
        let mut bad = t.clone();
        bad.priority.bands[0].name = "batch".into();
        assert!(bad.validate().unwrap_err().to_string().contains("per-batch"));
    }

    #[test]
    fn bad_bands_are_refused() {
        let base = repo();
        let refused = |edit: &dyn Fn(&mut Vec<PriorityBand>), needle: &str| {
            let mut t = base.clone();
            edit(&mut t.priority.bands);
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains("priority.bands") && err.contains(needle), "{err}");
        };
        refused(&|b| b[2].min = 2, "priority 1");
        refused(&|b| b[1].min = 9, "decrease");
        refused(&|b| b[0].weight = 0, "starve");
        refused(&|b| b[1].name = "high".into(), "unique");
        refused(&|b| b[0].name = "a.b".into(), "letters");
        refused(&|b| b.clear(), "1 to 10");
    }
}
