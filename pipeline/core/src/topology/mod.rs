//! `topology.toml`: the one typed description of a deployment.
//!
//! Each section of the file is a config struct in a file of its own, with its
//! defaults and its checks beside it. Unknown keys are rejected, so a typo is an
//! error naming the key, not a silently ignored setting. URLs and secrets can be
//! overridden from the environment ([`env::ENV_OVERRIDES`]); secrets never leave
//! the process (see [`crate::secret`]).
//!
//! ## Layout
//! - this file: [`Topology`], loading, validation of the whole, and the names derived
//!   from it (streams, dead-letter subjects);
//! - [`env`]: the environment overrides, each declared once;
//! - `nats.rs`: `[nats]` and `[nats.auth]`; `object_store.rs`: `[object_store]`;
//!   `postgres.rs`: `[postgres]`; `retry.rs`: `[retry]` and the retry horizon;
//! - `stage.rs`: what every `[stages.<name>]` has, and [`StageView`];
//! - `extract.rs`, `detect.rs`, `crop.rs`, `persist.rs`: each stage's `params`;
//! - `api.rs`: `[api]`; `priority.rs`: `[priority]` and the band subjects;
//!   `retention.rs`: `[retention]`; `reconcile.rs`: `[reconcile]`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod api;
mod crop;
mod detect;
pub mod env;
mod extract;
mod nats;
mod object_store;
mod persist;
mod postgres;
mod priority;
mod reconcile;
mod retention;
mod retry;
mod stage;

pub use api::ApiConfig;
pub use crop::{CropAlign, CropParams, CropPolicy};
pub use detect::{DetectFallback, DetectParams, DetectorKind, InferenceEngine, SecondPass, RETINAFACE_NETWORK_SHA256};
pub use env::{EnvOverride, ENV_OVERRIDES};
pub use extract::ExtractParams;
pub use nats::{NatsAuth, NatsConfig, NatsServers, ServersError, StorageKind, UrlCredentials};
pub use object_store::ObjectStoreConfig;
pub use persist::PersistParams;
pub use postgres::PostgresConfig;
pub use priority::{PriorityBand, PriorityConfig, StageBand};
pub use reconcile::ReconcileConfig;
pub use retention::RetentionConfig;
pub use retry::RetryConfig;
pub use stage::{StageConfig, StageView, Stages};

pub use crate::domain::StageName;

/// Environment variable naming the topology file when `--topology` is not given.
pub const TOPOLOGY_ENV: &str = "PIPELINE_TOPOLOGY";

/// Why a topology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("cannot read topology file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema; the message names the key.
    #[error("invalid topology file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the offending key and line.
        message: String,
    },
    /// The file parses but a value is out of range or inconsistent.
    #[error("invalid topology: `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the offending key (or the environment variable that set it).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `Ok` when `ok`, else [`TopologyError::Invalid`] naming `key`: the checks of every section read as a list.
pub(crate) fn ensure(ok: bool, key: &str, reason: &str) -> Result<(), TopologyError> {
    if ok {
        Ok(())
    } else {
        Err(TopologyError::Invalid { key: key.to_string(), reason: reason.to_string() })
    }
}

/// The whole deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// NATS connection and stream settings.
    pub nats: NatsConfig,
    /// Where originals and crops are stored.
    pub object_store: ObjectStoreConfig,
    /// Where outcomes are recorded.
    pub postgres: PostgresConfig,
    /// Retry policy shared by all stages (Nak delays).
    #[serde(default)]
    pub retry: RetryConfig,
    /// The four stages.
    pub stages: Stages,
    /// The HTTP API served by `pipeline serve`.
    #[serde(default)]
    pub api: ApiConfig,
    /// Priority bands: how priorities 1-10 share each stage's workers.
    #[serde(default)]
    pub priority: PriorityConfig,
    /// How long a batch's objects are kept once it completes.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Re-driving work the broker lost, from PostgreSQL's record of it.
    #[serde(default)]
    pub reconcile: ReconcileConfig,
}

impl Topology {
    /// Reads, parses, overrides from the environment, and validates a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read { path: path.to_owned(), source })?;
        let mut topology = Self::parse(&text).map_err(|e| match e {
            TopologyError::Parse { message, .. } => TopologyError::Parse { path: path.to_owned(), message },
            other => other,
        })?;
        topology.apply_env(|k| std::env::var(k).ok())?;
        topology.validate()?;
        Ok(topology)
    }

    /// Parses TOML text without environment overrides or validation.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        toml::from_str(text).map_err(|e| TopologyError::Parse { path: PathBuf::from("<text>"), message: describe(text, &e) })
    }

    /// The topology as TOML, without its secrets: what the key-value bucket holds
    /// and what a file written from it holds (secrets are never serialized).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a topology is plain data")
    }

    /// Checks every section, and that the stages connect extract -> detect -> crop -> persist.
    pub fn validate(&self) -> Result<(), TopologyError> {
        self.nats.validate()?;
        self.postgres.validate()?;
        self.retry.validate()?;
        self.stages.validate()?;
        // A retried message must still be recognized as a duplicate when it is published again.
        let horizon = self.retry_horizon();
        ensure(
            self.nats.duplicate_window >= horizon,
            "nats.duplicate_window",
            &format!("must cover the retry horizon ({horizon:?}: every stage's ack waits and retry delays)"),
        )?;
        if let Some(limit) = self.nats.stream_max_bytes {
            // A stream smaller than a message it must take could never take it.
            let largest = StageName::ALL.iter().map(|&s| self.stage(s).max_message_bytes).max().unwrap_or(0);
            ensure(
                limit.as_u64() >= largest as u64,
                "nats.stream_max_bytes",
                &format!("must hold the largest message a stage takes (max_message_bytes: {largest})"),
            )?;
        }
        self.priority.validate()?;
        self.object_store.validate()?;
        self.api.validate()?;
        self.retention.validate()?;
        self.reconcile.validate()?;
        Ok(())
    }

    /// Stream name of a stage: `<prefix>_<STAGE>`.
    pub fn stream_name(&self, name: StageName) -> String {
        format!("{}_{}", self.nats.stream_prefix, name.as_str().to_uppercase())
    }

    /// Stream name of the dead letters: `<prefix>_DLQ`.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.nats.stream_prefix)
    }

    /// Subject of a dead letter from `stage`.
    pub fn dead_letter_subject(&self, stage: StageName) -> String {
        format!("{}.{}", self.nats.dead_letter_subject, stage)
    }

    /// The persist stage's input subject, where image outcomes (including failures) go.
    pub fn outcome_subject(&self) -> &str {
        &self.stages.persist.subject
    }
}

/// toml's error as `line N: `section.key`: message`. Not toml's own rendering, which
/// quotes the offending line: that line may hold a password (a `postgres.url` whose
/// `sslmode` is misspelt, say).
fn describe(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.message().to_string() };
    let line_no = text[..span.start.min(text.len())].matches('\n').count();
    let lines: Vec<&str> = text.lines().collect();
    let key = lines.get(line_no).and_then(|l| l.split_once('=')).map(|(k, _)| k.trim()).filter(|k| !k.is_empty());
    let section = lines[..line_no.min(lines.len())]
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[').map(|h| h.trim_start_matches('[').split(']').next().unwrap_or("").trim()));
    match (section, key) {
        (Some(section), Some(key)) => format!("line {}: `{section}.{key}`: {}", line_no + 1, e.message()),
        (None, Some(key)) => format!("line {}: `{key}`: {}", line_no + 1, e.message()),
        _ => format!("line {}: {}", line_no + 1, e.message()),
    }
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, in any case) as a flag.
pub(crate) fn parse_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// A name usable in a stream, consumer or subject token: letters, digits, `-`, `_`.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A NATS subject without wildcards.
pub(crate) fn is_subject(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(char::is_whitespace))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The repository's `topology.toml`, parsed.
    pub(crate) fn repo() -> Topology {
        Topology::parse(&repo_text()).unwrap()
    }

    /// The repository's `topology.toml`, as text.
    pub(crate) fn repo_text() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.toml")).unwrap()
    }

    /// Every key of the typed configuration, dotted (`stages.detect.params.width`); arrays of
    /// tables give their fields (`priority.bands.name`).
    fn keys(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>, sections: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                sections.push(prefix.to_string());
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    keys(&key, v, out, sections);
                }
            }
            serde_json::Value::Array(items) if items.first().is_some_and(|v| v.is_object()) => keys(prefix, &items[0], out, sections),
            _ => out.push(prefix.to_string()),
        }
    }

    #[test]
    fn the_topology_reference_names_every_key_and_no_other() {
        let mut t = repo();
        // Optional values, so their keys are listed too; secrets are never serialized,
        // so they are named here.
        t.stages.detect.params.second_pass = SecondPass::with_model("m.onnx".into());
        t.reconcile.stalled_after = Some(std::time::Duration::from_secs(60));
        t.nats.stream_max_bytes = Some(bytesize::ByteSize::gib(1));
        t.api.upload_dir = Some("spool".into());
        t.nats.auth.creds_file = Some("c".into());
        let (mut all, mut sections) = (Vec::new(), Vec::new());
        keys("", &serde_json::to_value(&t).unwrap(), &mut all, &mut sections);
        all.extend(["nats.auth.password", "nats.auth.token", "api.token"].map(String::from));
        let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/topology.md")).unwrap();
        let documented: std::collections::BTreeSet<&str> = reference
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .filter(|k| k.contains('.') || all.iter().any(|a| a == k))
            .collect();
        let missing: Vec<&String> = all.iter().filter(|k| !documented.contains(k.as_str())).collect();
        assert!(missing.is_empty(), "docs/topology.md lacks {missing:?}");
        let known: std::collections::BTreeSet<&str> = all.iter().chain(&sections).map(String::as_str).collect();
        let stale: Vec<&&str> = documented.iter().filter(|k| !known.contains(**k) && !k.starts_with("PIPELINE_")).collect();
        assert!(stale.is_empty(), "docs/topology.md names keys the configuration does not have: {stale:?}");
        // And every environment override, with the key it sets.
        for o in ENV_OVERRIDES {
            assert!(reference.contains(&format!("| `{}` | `{}` |", o.var, o.key)), "docs/topology.md lacks the row of {}", o.var);
        }
    }

    #[test]
    fn repo_topology_is_valid() {
        let t = repo();
        t.validate().unwrap();
        assert_eq!(t.stages.crop.params.output_size, 300);
        assert_eq!(t.stages.crop.params.jpeg_quality, 90);
        assert_eq!(t.stages.detect.params.width, 640);
        assert_eq!(t.stream_name(StageName::Detect), "FACES_DETECT");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = repo_text().replace("[stages.crop.params]", "[stages.crop.params]\npaddin = 0.3");
        let err = Topology::parse(&text).unwrap_err().to_string();
        assert!(err.contains("paddin"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = repo_text().replacen("ack_wait = \"30s\"", "ack_wait = \"thirty\"", 1);
        let err = Topology::parse(&text).unwrap_err().to_string();
        assert!(err.contains("ack_wait"), "{err}");
    }

    #[test]
    fn a_bad_value_is_named_without_quoting_its_line() {
        let text = repo_text().replace("postgres://facepipe:facepipe@127.0.0.1:5432/facepipe", "postgres://u:pg-secret@db/x?sslmode=verify");
        let err = Topology::parse(&text).unwrap_err().to_string();
        assert!(err.contains("`postgres.url`: unknown sslmode `verify`"), "{err}");
        assert!(!err.contains("pg-secret"), "{err}");
        let text = repo_text().replace("[stages.crop.params]", "[stages.crop.params]\npadding = \"wide\"");
        let err = Topology::parse(&text).unwrap_err().to_string();
        assert!(err.contains("`stages.crop.params.padding`"), "{err}");
    }

    #[test]
    fn duplicate_window_must_cover_retries() {
        let mut t = repo();
        assert!(t.retry_horizon() <= t.nats.duplicate_window);
        t.nats.duplicate_window = std::time::Duration::from_secs(30);
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("nats.duplicate_window"), "{err}");
    }

    /// Every secret the topology can hold, set in the file's own forms, is absent
    /// from what is shown (`Debug`) and from what is shared (`to_toml`).
    #[test]
    fn no_secret_is_printed_or_serialized() {
        let secrets = ["pg-secret", "nats-secret", "tok-secret", "api-secret", "url-secret"];
        let text = repo_text()
            .replace("postgres://facepipe:facepipe@", "postgres://facepipe:pg-secret@")
            .replace("url = \"nats://127.0.0.1:4222\"", "url = \"nats://u:url-secret@127.0.0.1:4222, nats://127.0.0.1:4223\"")
            .replace("# user = \"facepipe\"", "user = \"u\"\npassword = \"nats-secret\"")
            .replace("# token = \"...\"                # env PIPELINE_NATS_TOKEN", "token = \"tok-secret\"")
            .replace("# token = \"...\"", "token = \"api-secret\"");
        let t = Topology::parse(&text).unwrap();
        assert_eq!(t.nats.auth.password.as_ref().map(|s| s.expose()), Some("nats-secret"));
        assert_eq!(t.api.token.as_ref().map(|s| s.expose()), Some("api-secret"));
        for shown in [format!("{t:?}"), t.to_toml(), serde_json::to_string(&t).unwrap()] {
            for secret in secrets {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
        // What is shared reads back as a valid topology, for the same servers.
        let shared = Topology::parse(&t.to_toml()).unwrap();
        assert_eq!(shared.nats.url.servers(), ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]);
        assert!(!shared.postgres.url.has_password() && shared.nats.auth.password.is_none() && shared.api.token.is_none());
    }
}
