//! `[object_store]`: where originals and crops are stored.

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};

/// Object store location, and how to reach an S3 server.
///
/// The S3 settings (`endpoint`, `region`, `allow_http`) are not secret and live
/// here; the keys never do: they come from `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (or the other sources `object_store` knows: a session
/// token, a web identity, the instance's metadata). An S3 setting left unset
/// here falls back to its `AWS_*` variable (`AWS_ENDPOINT`, `AWS_REGION`,
/// `AWS_ALLOW_HTTP`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// `file:///abs/path`, `file://relative/path` (relative to the working directory),
    /// or `s3://bucket/prefix`.
    pub url: String,
    /// S3: the server's URL, for an S3-compatible store (`http://minio:9000`); unset:
    /// `AWS_ENDPOINT`, else Amazon S3 itself. Requests are path-style (`<endpoint>/<bucket>/<key>`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3: the bucket's region, which requests are signed for; unset: `AWS_REGION`, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// S3: allow an `http://` endpoint (no TLS); unset: `AWS_ALLOW_HTTP`, else `false`.
    #[serde(default)]
    pub allow_http: Option<bool>,
}

impl ObjectStoreConfig {
    /// A store at `url` with every S3 setting left to the environment.
    pub fn at(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    /// True for an `s3://` store.
    pub fn is_s3(&self) -> bool {
        self.url.starts_with("s3://")
    }

    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(
            ["file://", "s3://"].iter().any(|scheme| self.url.starts_with(scheme)),
            "object_store.url",
            "must be file:///path, file://relative/path or s3://bucket/prefix",
        )?;
        ensure(!self.url.contains('@'), "object_store.url", "holds no credentials: the keys come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")?;
        if self.is_s3() {
            let bucket = self.url.trim_start_matches("s3://").split('/').next();
            ensure(bucket.is_some_and(|b| !b.is_empty()), "object_store.url", "an s3:// URL names its bucket: s3://bucket/prefix")?;
        }
        if let Some(endpoint) = &self.endpoint {
            let parsed = url::Url::parse(endpoint).ok().filter(|u| ["http", "https"].contains(&u.scheme()) && u.has_host());
            ensure(parsed.is_some(), "object_store.endpoint", "must be an http:// or https:// URL")?;
            let parsed = parsed.expect("checked");
            // The keys never go in the topology, which is shared with every process.
            ensure(
                parsed.username().is_empty() && parsed.password().is_none(),
                "object_store.endpoint",
                "holds no credentials: the keys come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )?;
            ensure(
                !(parsed.scheme() == "http" && self.allow_http == Some(false)),
                "object_store.allow_http",
                "an http:// endpoint needs allow_http = true",
            )?;
        }
        ensure(self.region.as_deref().is_none_or(|r| !r.is_empty()), "object_store.region", "must not be empty")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::{repo, repo_text};
    use crate::topology::Topology;

    #[test]
    fn s3_settings_come_from_the_file_or_the_environment() {
        let text = repo_text().replace(
            "url = \"file://var/objects\"",
            "url = \"s3://facepipe/runs\"\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"\nallow_http = true",
        );
        let t = Topology::parse(&text).unwrap();
        t.validate().unwrap();
        assert!(t.object_store.is_s3());
        assert_eq!(t.object_store.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((t.object_store.region.as_deref(), t.object_store.allow_http), (Some("eu-west-1"), Some(true)));

        // The repository's file leaves them to the environment, as compose.yaml sets them.
        let mut t = repo();
        assert_eq!(t.object_store, ObjectStoreConfig::at("file://var/objects"));
        t.apply_env(|k| match k {
            "PIPELINE_OBJECT_STORE_URL" => Some("s3://facepipe".into()),
            "PIPELINE_OBJECT_STORE_ENDPOINT" => Some("http://minio:9000".into()),
            "PIPELINE_OBJECT_STORE_REGION" => Some("us-east-1".into()),
            "PIPELINE_OBJECT_STORE_ALLOW_HTTP" => Some("TRUE".into()),
            _ => None,
        })
        .unwrap();
        t.validate().unwrap();
        assert_eq!(t.object_store.allow_http, Some(true));

        let refused = |edit: &dyn Fn(&mut ObjectStoreConfig), key: &str| {
            let mut bad = t.clone();
            edit(&mut bad.object_store);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        };
        refused(&|s| s.allow_http = Some(false), "object_store.allow_http");
        refused(&|s| s.endpoint = Some("minio:9000".into()), "object_store.endpoint");
        refused(&|s| s.endpoint = Some("ftp://minio".into()), "object_store.endpoint");
        refused(&|s| s.endpoint = Some("http://key:secret@minio:9000".into()), "object_store.endpoint");
        refused(&|s| s.region = Some(String::new()), "object_store.region");
        refused(&|s| s.url = "s3://".into(), "object_store.url");
        refused(&|s| s.url = "s3://key:secret@bucket".into(), "object_store.url");
        refused(&|s| s.url = "gs://bucket".into(), "object_store.url");
    }
}
