//! `[nats]` and `[nats.auth]`: the connection, the streams' settings, authentication and TLS.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ensure, is_subject, is_token, TopologyError};
use crate::secret::Secret;

/// NATS connection and JetStream stream settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`, or a comma-separated list of a
    /// cluster's servers (as the `nats` CLI's `--server` takes them); the client
    /// connects to one and fails over to the others.
    pub url: NatsServers,
    /// Prefix of stream names: the stage `detect` uses stream `<prefix>_DETECT`.
    #[serde(default = "default_stream_prefix")]
    pub stream_prefix: String,
    /// `file` (survives a server restart) or `memory`.
    #[serde(default)]
    pub storage: StorageKind,
    /// Replicas of every stream the pipeline owns (its dead letters included) and of
    /// the `<prefix>_CONFIG` key-value bucket: 1 on a single server, 3 or 5 in a cluster.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped; must cover the retry horizon.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// The most each stage's stream may hold (`"1 GiB"`, or bytes), reserved on the
    /// servers when `pipeline apply` creates it; unset, a stream grows until the server's
    /// store is full. With it set, a stage whose next stream is at its limit waits (extract
    /// stops ingesting) while the streams after it still have room, so a full store
    /// cannot wedge the flow. Four times it must fit in the servers' `max_file_store`
    /// (see docs/operations.md).
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "bytes_as_integer")]
    pub stream_max_bytes: Option<bytesize::ByteSize>,
    /// Subject prefix of the dead-letter stream: dead letters go to `<subject>.<stage>`.
    #[serde(default = "default_dead_letter_subject")]
    pub dead_letter_subject: String,
    /// Subject prefix of batch progress events: persist publishes `<subject>.<batch>`
    /// (plain NATS, not stored) after every recorded outcome.
    #[serde(default = "default_progress_subject")]
    pub progress_subject: String,
    /// Authentication and TLS (all optional; secrets best come from the environment).
    #[serde(default)]
    pub auth: NatsAuth,
}

/// Written as a plain byte count, which reads back exactly (the text form rounds).
fn bytes_as_integer<S: serde::Serializer>(size: &Option<bytesize::ByteSize>, out: S) -> Result<S::Ok, S::Error> {
    match size {
        Some(size) => out.serialize_some(&size.as_u64()),
        None => out.serialize_none(),
    }
}

fn default_stream_prefix() -> String {
    "FACES".into()
}
fn one() -> usize {
    1
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(20 * 60)
}
fn default_dead_letter_subject() -> String {
    "faces.dead".into()
}
fn default_progress_subject() -> String {
    "faces.progress".into()
}

impl NatsConfig {
    /// The servers of `url`, one per comma-separated entry, without credentials.
    pub fn servers(&self) -> &[String] {
        self.url.servers()
    }

    /// The credentials to connect with: those of `[nats.auth]`, else those a URL carried.
    pub fn credentials(&self) -> NatsAuth {
        let mut auth = self.auth.clone();
        if auth.user.is_none() && auth.token.is_none() {
            match self.url.credentials() {
                Some(UrlCredentials::UserPassword { user, password }) => {
                    auth.user = Some(user.clone());
                    auth.password = Some(password.clone());
                }
                Some(UrlCredentials::Token(token)) => auth.token = Some(token.clone()),
                None => {}
            }
        }
        auth
    }

    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        ensure(!self.url.servers().is_empty(), "nats.url", "must name at least one server")?;
        ensure((1..=5).contains(&self.replicas), "nats.replicas", "must be 1 to 5 (JetStream's limit; 3 or 5 in a cluster)")?;
        let auth = &self.auth;
        ensure(auth.user.is_some() == auth.password.is_some(), "nats.auth", "`user` and `password` go together")?;
        ensure(auth.tls_cert.is_some() == auth.tls_key.is_some(), "nats.auth", "`tls_cert` and `tls_key` go together")?;
        ensure(is_token(&self.stream_prefix), "nats.stream_prefix", "use letters, digits, '-' or '_'")?;
        ensure(is_subject(&self.progress_subject), "nats.progress_subject", "not a valid NATS subject")?;
        ensure(is_subject(&self.dead_letter_subject), "nats.dead_letter_subject", "not a valid NATS subject")
    }
}

/// `nats.url`, read into its servers. A `user:password@` or `token@` in a URL is
/// taken out of it as it is read and kept as a secret ([`NatsServers::credentials`]),
/// so the servers themselves, which are shown and shared, never carry one.
#[derive(Clone, PartialEq)]
pub struct NatsServers {
    servers: Vec<String>,
    credentials: Option<UrlCredentials>,
}

/// Credentials found in a server URL (the first server that carried any).
#[derive(Debug, Clone, PartialEq)]
pub enum UrlCredentials {
    /// `nats://user:password@host`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// `nats://token@host`.
    Token(Secret),
}

/// A server of `nats.url` that is not a URL.
#[derive(Debug, thiserror::Error)]
#[error("server {position} of the list is not a URL (nats://host:port): {reason}")]
pub struct ServersError {
    /// 1-based position in the comma-separated list.
    position: usize,
    /// The URL parser's reason (it never echoes the text).
    reason: url::ParseError,
}

impl NatsServers {
    /// The servers, each `nats://host:port` (or `tls://`, `ws://`...) without credentials.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// The credentials a URL carried, if any.
    pub fn credentials(&self) -> Option<&UrlCredentials> {
        self.credentials.as_ref()
    }
}

impl FromStr for NatsServers {
    type Err = ServersError;

    fn from_str(list: &str) -> Result<Self, ServersError> {
        let mut out = Self { servers: Vec::new(), credentials: None };
        for (i, entry) in list.split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
            // `host:port` alone is a NATS URL too, as the client takes it.
            let text = if entry.contains("://") { entry.to_string() } else { format!("nats://{entry}") };
            let mut url = url::Url::parse(&text).map_err(|reason| ServersError { position: i + 1, reason })?;
            // URL userinfo is percent-encoded, not form-encoded: `+` is a plus and `&` an ordinary character.
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            let (user, password) = (decode(url.username()), url.password().map(decode));
            if !user.is_empty() && out.credentials.is_none() {
                out.credentials = Some(match password {
                    Some(password) => UrlCredentials::UserPassword { user, password: Secret::new(password) },
                    None => UrlCredentials::Token(Secret::new(user)),
                });
            }
            let _ = url.set_username("");
            let _ = url.set_password(None);
            out.servers.push(url.to_string());
        }
        Ok(out)
    }
}

impl std::fmt::Display for NatsServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.servers.join(","))
    }
}

impl std::fmt::Debug for NatsServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"{}", if self.credentials.is_some() { " (credentials ***)" } else { "" })
    }
}

impl Serialize for NatsServers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NatsServers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// How to authenticate to NATS and secure the connection. A `user:password@`
/// in the URL works too. The password and the token are never serialized nor shown.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    /// User name (with `password`). Env: `PIPELINE_NATS_USER`.
    #[serde(default)]
    pub user: Option<String>,
    /// Password. Env: `PIPELINE_NATS_PASSWORD`.
    #[serde(default, skip_serializing)]
    pub password: Option<Secret>,
    /// Token. Env: `PIPELINE_NATS_TOKEN`.
    #[serde(default, skip_serializing)]
    pub token: Option<Secret>,
    /// Credentials file (user JWT and NKey seed, as `nsc` writes it). Env: `PIPELINE_NATS_CREDS`.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// Require TLS even when the server does not ask for it.
    #[serde(default)]
    pub tls_required: bool,
    /// PEM file of the CA that signed the server's certificate.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `tls_key`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

/// JetStream storage backend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// On disk.
    #[default]
    File,
    /// In memory (lost on server restart).
    Memory,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::repo;

    fn servers(s: &str) -> NatsServers {
        s.parse().unwrap()
    }

    #[test]
    fn url_credentials_are_taken_out_percent_decoded() {
        // The password `p+&@%/x`, percent-encoded where a URL needs it.
        let s = servers("nats://alice:p+&%40%25%2Fx@127.0.0.1:4222");
        assert_eq!(s.servers(), ["nats://127.0.0.1:4222"]);
        match s.credentials() {
            Some(UrlCredentials::UserPassword { user, password }) => assert_eq!((user.as_str(), password.expose()), ("alice", "p+&@%/x")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(servers("nats://s3cr%2Bt@h:4222").credentials(), Some(UrlCredentials::Token(t)) if t.expose() == "s3cr+t"));
        assert_eq!(servers("nats://h:4222").credentials(), None);
        assert_eq!(servers("127.0.0.1:4222").servers(), ["nats://127.0.0.1:4222"]);
    }

    #[test]
    fn a_cluster_list_gives_every_server_and_the_credentials_once() {
        let s = servers("nats://u:p@h1:4222, nats://u:p@h2:4223,nats://h3:4224");
        assert_eq!(s.servers(), ["nats://h1:4222", "nats://h2:4223", "nats://h3:4224"]);
        assert_eq!(s.to_string(), "nats://h1:4222,nats://h2:4223,nats://h3:4224");
        assert_eq!(format!("{s:?}"), "\"nats://h1:4222,nats://h2:4223,nats://h3:4224\" (credentials ***)");
    }

    #[test]
    fn auth_settings_win_over_url_credentials() {
        let mut t = repo();
        t.nats.url = servers("nats://u:from-url@h:4222");
        assert_eq!(t.nats.credentials().password.unwrap().expose(), "from-url");
        t.nats.auth.user = Some("v".into());
        t.nats.auth.password = Some(Secret::new("from-auth"));
        assert_eq!(t.nats.credentials().password.unwrap().expose(), "from-auth");
    }

    #[test]
    fn a_cluster_is_a_server_list_with_replicas_from_one_to_five() {
        let mut t = repo();
        t.apply_env(|k| match k {
            "PIPELINE_NATS_URL" => Some("nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224".into()),
            "PIPELINE_NATS_REPLICAS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(t.nats.servers(), ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]);
        assert_eq!(t.nats.replicas, 3);
        t.validate().unwrap();
        for bad in [0, 6] {
            t.nats.replicas = bad;
            assert!(t.validate().unwrap_err().to_string().contains("nats.replicas"), "{bad}");
        }
        t.nats.replicas = 1;
        t.nats.url = servers(" , ");
        assert!(t.validate().unwrap_err().to_string().contains("nats.url"));
    }

    #[test]
    fn user_and_password_go_together() {
        let mut half = repo();
        half.nats.auth.user = Some("u".into());
        assert!(half.validate().unwrap_err().to_string().contains("nats.auth"));
    }
}
