//! `[postgres]`: where outcomes are recorded.

use serde::{Deserialize, Serialize};

use super::{ensure, TopologyError};
use crate::database_url::DatabaseUrl;

/// PostgreSQL connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` or libpq's keyword form, read into
    /// typed settings; its password is never shown nor shared. Prefer
    /// `PIPELINE_DATABASE_URL` or `PIPELINE_DATABASE_PASSWORD` for the password.
    pub url: DatabaseUrl,
    /// Connections per process.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    4
}

impl PostgresConfig {
    pub(super) fn validate(&self) -> Result<(), TopologyError> {
        // sslrootcert, as the processes will read it (the message never holds the URL).
        if let Err(e) = self.url.check_files() {
            return ensure(false, "postgres.url", &e.to_string());
        }
        ensure(self.pool_size >= 1, "postgres.pool_size", "must be at least 1")
    }
}

#[cfg(test)]
mod tests {
    use crate::topology::tests::{repo, repo_text};
    use crate::topology::Topology;

    #[test]
    fn database_tls_settings_are_checked() {
        let with = |url: &str| Topology::parse(&repo_text().replace("postgres://facepipe:facepipe@127.0.0.1:5432/facepipe", url));
        let e = with("postgres://u:pg-secret@db/x?sslmode=verify").unwrap_err().to_string();
        assert!(e.contains("unknown sslmode `verify`"), "{e}");
        assert!(!e.contains("pg-secret"), "{e}");
        let e = with("postgres://u@db/x?sslmode=verify-full").unwrap_err().to_string();
        assert!(e.contains("sslmode=verify-full verifies the server's certificate and needs sslrootcert"), "{e}");
        let t = with("postgres://u@db/x?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem").unwrap();
        let e = t.validate().unwrap_err().to_string();
        assert!(e.starts_with("invalid topology: `postgres.url`: sslrootcert /nonexistent/ca.pem: cannot read it"), "{e}");
        with("postgres://u@db/x?sslmode=require").unwrap().validate().unwrap();
        with("postgres://u@db/x?sslmode=verify-full&sslrootcert=system").unwrap().validate().unwrap();
        assert!(repo().postgres.url.has_password(), "the repository's development role has one");
    }
}
