//! Environment variables that override the file: each declared once, with the
//! key it sets and how, so the list, the docs check and the code cannot drift.

use super::{parse_flag, Topology, TopologyError};
use crate::secret::Secret;

/// One environment override.
pub struct EnvOverride {
    /// The variable, `PIPELINE_...`.
    pub var: &'static str,
    /// The dotted topology key it sets.
    pub key: &'static str,
    /// Sets the key from the variable's value, or says why the value cannot be used
    /// (the reason never holds the value: it may be a secret).
    set: fn(&mut Topology, String) -> Result<(), String>,
}

fn flag(value: &str) -> Result<bool, String> {
    parse_flag(value).ok_or_else(|| format!("`{value}` is not a flag: use true or false"))
}

/// Every override, applied in this order by [`Topology::apply_env`].
pub const ENV_OVERRIDES: &[EnvOverride] = &[
    EnvOverride {
        var: "PIPELINE_NATS_URL",
        key: "nats.url",
        set: |t, v| { t.nats.url = v.parse().map_err(|e: super::nats::ServersError| e.to_string())?; Ok(()) },
    },
    // Not a number: 0, which validation refuses with the key's name.
    EnvOverride { var: "PIPELINE_NATS_REPLICAS", key: "nats.replicas", set: |t, v| { t.nats.replicas = v.trim().parse().unwrap_or(0); Ok(()) } },
    EnvOverride { var: "PIPELINE_NATS_USER", key: "nats.auth.user", set: |t, v| { t.nats.auth.user = Some(v); Ok(()) } },
    EnvOverride { var: "PIPELINE_NATS_PASSWORD", key: "nats.auth.password", set: |t, v| { t.nats.auth.password = Some(Secret::new(v)); Ok(()) } },
    EnvOverride { var: "PIPELINE_NATS_TOKEN", key: "nats.auth.token", set: |t, v| { t.nats.auth.token = Some(Secret::new(v)); Ok(()) } },
    EnvOverride { var: "PIPELINE_NATS_CREDS", key: "nats.auth.creds_file", set: |t, v| { t.nats.auth.creds_file = Some(v.into()); Ok(()) } },
    EnvOverride { var: "PIPELINE_OBJECT_STORE_URL", key: "object_store.url", set: |t, v| { t.object_store.url = v; Ok(()) } },
    EnvOverride { var: "PIPELINE_OBJECT_STORE_ENDPOINT", key: "object_store.endpoint", set: |t, v| { t.object_store.endpoint = Some(v); Ok(()) } },
    EnvOverride { var: "PIPELINE_OBJECT_STORE_REGION", key: "object_store.region", set: |t, v| { t.object_store.region = Some(v); Ok(()) } },
    EnvOverride {
        var: "PIPELINE_OBJECT_STORE_ALLOW_HTTP",
        key: "object_store.allow_http",
        set: |t, v| { t.object_store.allow_http = Some(flag(&v)?); Ok(()) },
    },
    EnvOverride {
        var: "PIPELINE_DATABASE_URL",
        key: "postgres.url",
        set: |t, v| { t.postgres.url = v.parse().map_err(|e: crate::database_url::DatabaseUrlError| e.to_string())?; Ok(()) },
    },
    // After the URL, so that a password kept apart from it is added to whichever URL is used.
    EnvOverride {
        var: "PIPELINE_DATABASE_PASSWORD",
        key: "postgres.url",
        set: |t, v| {
            t.postgres.url.set_password(&Secret::new(v));
            Ok(())
        },
    },
    EnvOverride { var: "PIPELINE_DETECT_MODEL", key: "stages.detect.params.model", set: |t, v| { t.stages.detect.params.model = Some(v.into()); Ok(()) } },
    EnvOverride {
        var: "PIPELINE_DETECT_OPENCV_MODEL",
        key: "stages.detect.params.opencv_model",
        set: |t, v| { t.stages.detect.params.opencv_model = Some(v.into()); Ok(()) },
    },
    EnvOverride {
        var: "PIPELINE_ONNXRUNTIME",
        key: "stages.detect.params.onnxruntime",
        set: |t, v| { t.stages.detect.params.onnxruntime = Some(v.into()); Ok(()) },
    },
    EnvOverride {
        var: "PIPELINE_DETECT_SECOND_PASS_MODEL",
        key: "stages.detect.params.second_pass.model",
        set: |t, v| {
            let second = &mut t.stages.detect.params.second_pass;
            second.model = v.into();
            second.enabled = true;
            Ok(())
        },
    },
    EnvOverride {
        var: "PIPELINE_RECONCILE_STALLED_AFTER",
        key: "reconcile.stalled_after",
        set: |t, v| { t.reconcile.stalled_after = Some(humantime::parse_duration(v.trim()).map_err(|e| format!("`{v}` is not a duration: {e}"))?); Ok(()) },
    },
    EnvOverride { var: "PIPELINE_API_TOKEN", key: "api.token", set: |t, v| { t.api.token = Some(Secret::new(v)); Ok(()) } },
    EnvOverride { var: "PIPELINE_API_LISTEN", key: "api.listen", set: |t, v| { t.api.listen = v; Ok(()) } },
    EnvOverride {
        var: "PIPELINE_API_ALLOW_UNAUTHENTICATED",
        key: "api.allow_unauthenticated",
        set: |t, v| { t.api.allow_unauthenticated = flag(&v)?; Ok(()) },
    },
];

impl Topology {
    /// Applies [`ENV_OVERRIDES`] looked up through `lookup` (an empty value is ignored);
    /// fails on a value that cannot be used, naming the variable and the key.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), TopologyError> {
        for o in ENV_OVERRIDES {
            if let Some(value) = lookup(o.var).filter(|v| !v.is_empty()) {
                (o.set)(self, value)
                    .map_err(|reason| TopologyError::Invalid { key: format!("{} (sets {})", o.var, o.key), reason })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::repo;

    #[test]
    fn env_overrides_urls() {
        let mut t = repo();
        t.apply_env(|k| match k {
            "PIPELINE_NATS_URL" => Some("nats://10.0.0.1:4222".into()),
            "PIPELINE_DATABASE_URL" => Some("postgres://u:secret@db/x".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(t.nats.url.servers(), ["nats://10.0.0.1:4222"]);
        assert_eq!(t.postgres.url.to_string(), "postgres://u@db:5432/x");
        assert_eq!(t.postgres.url.config().get_password(), Some(&b"secret"[..]));
        assert!(t.object_store.url.starts_with("file://"));
    }

    #[test]
    fn the_database_password_can_come_on_its_own() {
        let mut t = repo();
        t.apply_env(|k| match k {
            "PIPELINE_DATABASE_URL" => Some("host=db user=facepipe dbname=facepipe".into()),
            "PIPELINE_DATABASE_PASSWORD" => Some("kept apart".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(t.postgres.url.config().get_password(), Some(&b"kept apart"[..]));
    }

    #[test]
    fn a_bad_value_names_the_variable_and_never_the_value() {
        let mut t = repo();
        let err = t.apply_env(|k| (k == "PIPELINE_OBJECT_STORE_ALLOW_HTTP").then(|| "maybe".into())).unwrap_err().to_string();
        assert!(err.contains("PIPELINE_OBJECT_STORE_ALLOW_HTTP") && err.contains("object_store.allow_http"), "{err}");
        let err = t
            .apply_env(|k| (k == "PIPELINE_DATABASE_URL").then(|| "postgres://u:pw-99@h/db?sslmode=nope".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("PIPELINE_DATABASE_URL") && !err.contains("pw-99"), "{err}");
    }

    #[test]
    fn every_variable_is_declared_once() {
        let mut vars: Vec<&str> = ENV_OVERRIDES.iter().map(|o| o.var).collect();
        vars.sort();
        let before = vars.len();
        vars.dedup();
        assert_eq!(before, vars.len());
    }
}
