//! [`DbError`]: why a database operation failed, each cause kept, and whether a retry can help.

use deadpool_postgres::PoolError;

use crate::tls::{handshake_failure, HandshakeFailure, TlsSetupError};

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL could not be parsed.
    #[error("invalid database url: {0}")]
    Config(String),
    /// TLS to the server could not be set up from the URL (`sslmode`, `sslrootcert`).
    #[error("database TLS settings: {0}")]
    TlsSetup(#[from] TlsSetupError),
    /// The server's certificate failed verification (wrong CA, host name, expired...).
    #[error("TLS to PostgreSQL failed: the server's certificate could not be verified: {reason}")]
    CertificateNotVerified {
        /// Why, in words.
        reason: String,
        /// tokio-postgres's error.
        source: tokio_postgres::Error,
    },
    /// The URL's `sslmode` requires TLS and the server does not offer it.
    #[error("TLS to PostgreSQL failed: the server does not support TLS, and the URL's sslmode requires it")]
    ServerWithoutTls(#[source] tokio_postgres::Error),
    /// Another TLS failure in the handshake (protocol version, an alert from the server).
    #[error("TLS to PostgreSQL failed: {reason}")]
    TlsHandshake {
        /// Why, in words.
        reason: String,
        /// tokio-postgres's error.
        source: tokio_postgres::Error,
    },
    /// No connection could be had from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[source] PoolError),
    /// A statement failed.
    #[error("database query failed: {0}")]
    Query(#[source] tokio_postgres::Error),
    /// The schema migrations could not be applied.
    #[error("schema migration failed: {0}")]
    Migration(#[from] refinery::Error),
    /// A stored value is not one the pipeline writes (the schema and the code disagree).
    #[error("unexpected value in the database: {0}")]
    Value(#[from] facepipe_core::domain::UnknownValue),
    /// A stored value does not read back (a job recorded with a batch, say).
    #[error("unexpected value in the database: {0}")]
    Stored(String),
    /// A stored priority is outside 1-10.
    #[error("unexpected value in the database: {0}")]
    Priority(#[from] facepipe_core::domain::PriorityError),
    /// The statement recording a group of outcomes failed (each outcome of the group gets it).
    #[error(transparent)]
    Group(std::sync::Arc<DbError>),
    /// An outcome names an image extract never registered.
    #[error("unknown image {image_id} in batch {batch_id}")]
    UnknownImage {
        /// Batch named by the outcome.
        batch_id: String,
        /// Image named by the outcome.
        image_id: String,
    },
}

impl DbError {
    /// True when retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            // Refused certificates and servers without TLS stay transient, as refused
            // passwords do: the server's side may be fixed while the process waits.
            Self::Config(_) | Self::TlsSetup(_) | Self::UnknownImage { .. } => true,
            // Migrations that disagree with the database's history will not agree later.
            Self::Migration(e) => !matches!(e.kind(), refinery::error::Kind::Connection(..)),
            Self::Group(e) => e.is_permanent(),
            _ => false,
        }
    }
}

impl facepipe_core::error::Classify for DbError {
    /// Outages and conflicts deserve a retry; an unknown image never will.
    fn kind(&self) -> facepipe_core::error::ErrorKind {
        if self.is_permanent() {
            facepipe_core::error::ErrorKind::Permanent
        } else {
            facepipe_core::error::ErrorKind::Transient
        }
    }
}

/// A TLS failure in words, or the error as it was.
fn tls_or(e: tokio_postgres::Error, otherwise: impl FnOnce(tokio_postgres::Error) -> DbError) -> DbError {
    match handshake_failure(&e) {
        Some(HandshakeFailure::ServerWithoutTls) => DbError::ServerWithoutTls(e),
        Some(HandshakeFailure::Certificate(reason)) => DbError::CertificateNotVerified { reason, source: e },
        Some(HandshakeFailure::Other(reason)) => DbError::TlsHandshake { reason, source: e },
        None => otherwise(e),
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        tls_or(e, Self::Query)
    }
}

/// A pool whose new connection failed in the TLS handshake says why.
impl From<PoolError> for DbError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => tls_or(e, |e| Self::Pool(PoolError::Backend(e))),
            e => Self::Pool(e),
        }
    }
}
