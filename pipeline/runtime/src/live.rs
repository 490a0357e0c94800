//! Live reconfiguration: `pipeline apply` stores the topology in a JetStream
//! key-value bucket (`<prefix>_CONFIG`, key `topology`) and every running stage
//! watches it, applying at once what can change without a restart.
//!
//! Live: each stage's `concurrency`, `params` (detector threshold, width and
//! model; crop size, padding, quality and policy; extract limits), `ack_wait`,
//! `max_deliver`, `max_ack_pending` and `shutdown_grace`, and the `[retry]`
//! policy. Everything else (connections, subjects, durables, bands, metrics
//! addresses) needs a restart, and `apply` says so in its plan.
//!
//! The stored copy carries no secrets: NATS credentials, the API token and the
//! database password are never serialized (`facepipe_core::secret`), so they stay
//! in each process's own file and environment.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::watch;

use crate::bus::{Bus, BusError};
use facepipe_core::topology::{StageName, Topology};

/// Key of the topology in the bucket.
pub const KEY: &str = "topology";

/// How a stored topology differs from a new one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// `key: old -> new` of settings running stages apply at once.
    pub live: Vec<String>,
    /// `key: old -> new` of settings that need the stages restarted.
    pub restart: Vec<String>,
}

impl Changes {
    /// True when nothing differs.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart.is_empty()
    }
}

/// The bucket's name for `topology`.
pub fn bucket(topology: &Topology) -> String {
    format!("{}_CONFIG", topology.nats.stream_prefix)
}

/// The topology stored by the last `apply`, if any.
pub async fn stored(bus: &Bus, topology: &Topology) -> Result<Option<Topology>, BusError> {
    let name = bucket(topology);
    let Ok(kv) = bus.js.get_key_value(&name).await else { return Ok(None) };
    let value = kv.get(KEY).await.map_err(|e| setup(&name, e))?;
    Ok(value.and_then(|bytes| Topology::parse(&String::from_utf8_lossy(&bytes)).ok()))
}

/// Stores `topology` (without secrets) for the running stages; returns the revision.
pub async fn publish(bus: &Bus, topology: &Topology) -> Result<u64, BusError> {
    let name = bucket(topology);
    let kv = match bus.js.get_key_value(&name).await {
        Ok(kv) => {
            // A change of `nats.replicas` applies to the bucket as to the streams, in place.
            let mut stream = bus.js.get_stream(format!("KV_{name}")).await.map_err(|e| setup(&name, e))?;
            let config = stream.info().await.map_err(|e| setup(&name, e))?.config.clone();
            if config.num_replicas != topology.nats.replicas {
                let config = async_nats::jetstream::stream::Config { num_replicas: topology.nats.replicas, ..config };
                bus.js.update_stream(config).await.map_err(|e| setup(&name, e))?;
            }
            kv
        }
        Err(_) => {
            // The bucket's stream, made directly with the key-value conventions:
            // `create_key_value` first queries the account, whose answer from
            // nats-server 2.9 this client cannot parse.
            use async_nats::jetstream::stream;
            let config = stream::Config {
                name: format!("KV_{name}"),
                description: Some("face pipeline: the applied topology, watched by running stages".into()),
                subjects: vec![format!("$KV.{name}.>")],
                max_messages_per_subject: 10,
                storage: crate::bus::storage(topology.nats.storage),
                num_replicas: topology.nats.replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            };
            bus.js.get_or_create_stream(config).await.map_err(|e| setup(&name, e))?;
            bus.js.get_key_value(&name).await.map_err(|e| setup(&name, e))?
        }
    };
    // Serialized without its secrets: they are never serialized (facepipe_core::secret).
    kv.put(KEY, topology.to_toml().into()).await.map_err(|e| setup(&name, e))
}

fn setup(what: &str, e: impl Into<crate::error::Cause>) -> BusError {
    BusError::Setup { what: format!("key-value bucket {what}"), source: e.into() }
}

/// Flattens a topology into `dotted.key -> value` (secrets removed).
fn flatten(topology: &Topology) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    let value = toml::Value::try_from(topology).expect("a topology is plain data");
    walk("", &value, &mut out);
    out
}

/// True for a dotted key running stages apply without a restart.
pub fn is_live(key: &str) -> bool {
    const STAGE_FIELDS: [&str; 6] = ["concurrency", "params", "ack_wait", "max_deliver", "max_ack_pending", "shutdown_grace"];
    if key.starts_with("retry.") {
        return true;
    }
    let mut parts = key.split('.');
    matches!((parts.next(), parts.next(), parts.next()), (Some("stages"), Some(_), Some(field)) if STAGE_FIELDS.contains(&field))
}

/// How `new` differs from `old`, split into live and restart-needing changes.
pub fn changes(old: &Topology, new: &Topology) -> Changes {
    let (old, new) = (flatten(old), flatten(new));
    let mut changes = Changes::default();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for key in keys {
        let (a, b) = (old.get(key), new.get(key));
        if a != b {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            let line = format!("{key}: {} -> {}", show(a), show(b));
            if is_live(key) { changes.live.push(line) } else { changes.restart.push(line) }
        }
    }
    changes
}

/// `current` with the live settings of `incoming` (the rest stays as the process started).
pub fn merge_live(current: &Topology, incoming: &Topology) -> Topology {
    let mut t = current.clone();
    t.retry = incoming.retry.clone();
    fn common<P: Clone>(to: &mut facepipe_core::topology::StageConfig<P>, from: &facepipe_core::topology::StageConfig<P>) {
        to.concurrency = from.concurrency;
        to.params = from.params.clone();
        to.ack_wait = from.ack_wait;
        to.max_deliver = from.max_deliver;
        to.max_ack_pending = from.max_ack_pending;
        to.shutdown_grace = from.shutdown_grace;
    }
    common(&mut t.stages.extract, &incoming.stages.extract);
    common(&mut t.stages.detect, &incoming.stages.detect);
    common(&mut t.stages.crop, &incoming.stages.crop);
    common(&mut t.stages.persist, &incoming.stages.persist);
    t
}

/// Watches the stored topology and sends every valid live change into `tx`, for as
/// long as the process runs. A missing bucket (no `apply` yet) just means nothing
/// changes live; a watch that ends (the bucket deleted with a server's store, then made
/// again by `apply`) is started again.
pub async fn watch(bus: Bus, stage: StageName, tx: watch::Sender<Arc<Topology>>) {
    let name = bucket(&tx.borrow());
    let mut last_stored: Option<Topology> = None;
    loop {
        let kv = loop {
            match bus.js.get_key_value(&name).await {
                Ok(kv) => break kv,
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(5)).await,
            }
        };
        match kv.watch_with_history(KEY).await {
            Ok(mut updates) => {
                while let Some(update) = updates.next().await {
                    match update {
                        Ok(entry) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                            apply_stored(stage, &tx, &mut last_stored, entry.revision, &entry.value)
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(bucket = name, error = %e, "the topology's watch failed; watching again");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(bucket = name, error = %e, "cannot watch the topology; trying again"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

/// Takes a stored topology's live settings into `tx` when they are valid and changed.
fn apply_stored(stage: StageName, tx: &watch::Sender<Arc<Topology>>, last_stored: &mut Option<Topology>, revision: u64, value: &[u8]) {
    let incoming = match Topology::parse(&String::from_utf8_lossy(value)) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(revision, error = %e, "stored topology does not parse; ignored");
            return;
        }
    };
    // Changes between two applies (not this process's own environment) that need a restart.
    if let Some(previous) = last_stored.replace(incoming.clone()) {
        let restart = changes(&previous, &incoming).restart;
        if !restart.is_empty() {
            tracing::warn!(%stage, changes = ?restart, "topology changes that need a restart of this process");
        }
    }
    let current = tx.borrow().clone();
    let mut merged = merge_live(&current, &incoming);
    // This process's own overrides (e.g. PIPELINE_DETECT_MODEL) still win.
    if let Err(e) = merged.apply_env(|k| std::env::var(k).ok()).and_then(|()| merged.validate()) {
        tracing::warn!(revision, error = %e, "stored topology is invalid; ignored");
        return;
    }
    let live = changes(&current, &merged).live;
    if !live.is_empty() {
        tracing::info!(%stage, revision, changes = ?live, "configuration changed live");
        tx.send_replace(Arc::new(merged));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Topology {
        Topology::parse(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.toml")).unwrap())
            .unwrap()
    }

    #[test]
    fn changes_are_split_into_live_and_restart() {
        let old = repo();
        let mut new = old.clone();
        new.stages.crop.params.output_size = 200;
        new.stages.detect.concurrency = 3;
        new.retry.base = std::time::Duration::from_secs(2);
        new.stages.detect.subject = "faces.scan".into();
        new.nats.auth.password = Some("never shown".into());
        let c = changes(&old, &new);
        assert_eq!(
            c.live,
            vec![
                "retry.base: \"1s\" -> \"2s\"",
                "stages.crop.params.output_size: 300 -> 200",
                "stages.detect.concurrency: 2 -> 3",
            ]
        );
        assert_eq!(c.restart, vec!["stages.detect.subject: \"faces.detect\" -> \"faces.scan\""]);
        assert!(changes(&old, &old).is_empty());

        let merged = merge_live(&old, &new);
        assert_eq!(merged.stages.crop.params.output_size, 200);
        assert_eq!(merged.stages.detect.subject, "faces.detect", "restart-only settings are not taken live");
    }

    #[test]
    fn stored_copy_has_no_secrets() {
        let mut t = repo();
        t.nats.auth.password = Some("nats-secret".into());
        t.nats.auth.user = Some("u".into());
        t.api.token = Some("api-secret".into());
        t.postgres.url = "host=db user=facepipe password='db secret' dbname=facepipe".parse().unwrap();
        let text = t.to_toml();
        for secret in ["nats-secret", "api-secret", "db secret"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        let mut changed = t.clone();
        changed.postgres.url = "postgres://facepipe:other-secret@db2/facepipe".parse().unwrap();
        let shown = format!("{:?}", changes(&t, &changed));
        assert!(shown.contains("db2") && !shown.contains("secret"), "{shown}");
    }
}
