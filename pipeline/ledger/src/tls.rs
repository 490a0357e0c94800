//! The one way to PostgreSQL: a [`DatabaseUrl`] made into tokio-postgres's config and the
//! rustls connector its `sslmode` and `sslrootcert` ask for.
//!
//! The URL's TLS parameters are read by [`facepipe_core::postgres_tls::PgTls`]; tokio-postgres
//! gets the rest, with `sslmode` `disable`, `prefer`, or `require` for the three modes that
//! encrypt. What the server's certificate must pass is then the connector's business:
//!
//! - `verify-full`: rustls's usual verifier (chain to `sslrootcert`, and the host name);
//! - `verify-ca`, and `prefer`/`require` with an `sslrootcert`: the chain only;
//! - `prefer`/`require` without `sslrootcert`: nothing (encrypted, not authenticated, as libpq).
//!
//! `sslrootcert=system` is the platform's roots (rustls-native-certs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use facepipe_core::database_url::DatabaseUrl;
use facepipe_core::postgres_tls::{load_pem_certificates, PgTls, PgTlsError, RootCert, SslMode, Verification};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why TLS to PostgreSQL could not be set up from the URL (before any connection).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// `sslmode` or `sslrootcert` cannot be used.
    #[error(transparent)]
    Settings(#[from] PgTlsError),
    /// A certificate in the `sslrootcert` file is not one rustls can trust.
    #[error("sslrootcert {path}: not a usable CA certificate: {source}")]
    RootCertRejected {
        /// The file.
        path: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// `sslrootcert=system` found no trusted root on this machine.
    #[error("sslrootcert=system: no trusted root certificate found on this machine{0}")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A database URL made ready to connect.
pub(crate) struct Target {
    /// tokio-postgres's configuration, with the `sslmode` it knows for the URL's.
    pub config: tokio_postgres::Config,
    /// The connector every connection to this URL goes through (also for `disable`,
    /// where tokio-postgres never calls it).
    pub tls: MakeRustlsConnect,
}

impl Target {
    /// The config and connector for `url` (reading `sslrootcert`). Errors never echo
    /// the URL: it may hold a password.
    pub fn new(url: &DatabaseUrl) -> Result<Self, TlsSetupError> {
        let settings = url.tls();
        let mut config = url.config().clone();
        config.ssl_mode(match settings.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let tls = MakeRustlsConnect::new(client_config(settings)?);
        Ok(Self { config, tls })
    }
}

/// tokio-postgres's error with its causes (its `Display` shows only the kind).
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The rustls client configuration `settings` ask for.
fn client_config(settings: &PgTls) -> Result<ClientConfig, TlsSetupError> {
    // Named explicitly rather than the process default: ring, as the rest of the workspace.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let roots = || match &settings.root_cert {
        Some(root) => root_store(root).map(Arc::new),
        None => Err(PgTlsError::RootCertMissing(settings.mode).into()),
    };
    let without_host_name = |roots| Arc::new(WithoutHostName { roots, algorithms });
    let mut config = match settings.verification() {
        Verification::None => builder.dangerous().with_custom_certificate_verifier(without_host_name(None)),
        Verification::Chain => builder.dangerous().with_custom_certificate_verifier(without_host_name(Some(roots()?))),
        Verification::ChainAndHostName => builder.with_root_certificates(roots()?),
    }
    .with_no_client_auth();
    // What libpq 17 sends; PostgreSQL 17 requires it for sslnegotiation=direct, older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// The trusted roots of `sslrootcert`.
fn root_store(root: &RootCert) -> Result<RootCertStore, TlsSetupError> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            for cert in load_pem_certificates(path)? {
                store.add(cert).map_err(|source| rejected(path, source))?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                let detail = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) };
                return Err(TlsSetupError::NoSystemRoots(detail));
            }
        }
    }
    Ok(store)
}

fn rejected(path: &Path, source: rustls::Error) -> TlsSetupError {
    TlsSetupError::RootCertRejected { path: path.to_path_buf(), source }
}

/// Checks the server's certificate chain against `roots` but not its host name
/// (`verify-ca`, and `prefer`/`require` with `sslrootcert`); with no roots it accepts any
/// certificate (`prefer`/`require` without `sslrootcert`, as libpq). Either way the
/// handshake's signatures are checked against the certificate presented.
#[derive(Debug)]
struct WithoutHostName {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for WithoutHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What went wrong in a TLS handshake with PostgreSQL, read from tokio-postgres's error.
pub(crate) enum HandshakeFailure {
    /// The server answered the TLS request with "no".
    ServerWithoutTls,
    /// rustls refused the server's certificate; the reason in words.
    Certificate(String),
    /// Any other TLS failure (protocol, alert); the reason in words.
    Other(String),
}

/// Reads a connection error: `None` unless it is a TLS failure.
pub(crate) fn handshake_failure(e: &tokio_postgres::Error) -> Option<HandshakeFailure> {
    use std::error::Error as _;
    // tokio-postgres does not expose its error kinds; its TLS errors say this.
    if e.to_string() != "error performing TLS handshake" {
        return None;
    }
    let cause = e.source()?;
    if cause.to_string() == "server does not support TLS" {
        return Some(HandshakeFailure::ServerWithoutTls);
    }
    let rustls_error = cause
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    Some(match rustls_error {
        Some(rustls::Error::InvalidCertificate(reason)) => HandshakeFailure::Certificate(certificate_reason(reason)),
        Some(other) => HandshakeFailure::Other(other.to_string()),
        None => HandshakeFailure::Other(describe(cause)),
    })
}

fn certificate_reason(reason: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    match reason {
        E::UnknownIssuer => "it is not signed by a CA in sslrootcert (unknown issuer)".to_string(),
        // A CA of the same name, but another key.
        E::BadSignature => "it is not signed by a CA in sslrootcert (a CA of that name is, but its signature does not match)".to_string(),
        E::NotValidForName => "it is not valid for the host name connected to (sslmode=verify-ca does not check the name)".to_string(),
        E::NotValidForNameContext { expected, presented } => format!(
            "it is not valid for the host name {} connected to; it names {} (sslmode=verify-ca does not check the name)",
            expected.to_str(),
            presented.join(", ")
        ),
        other => rustls::Error::InvalidCertificate(other.clone()).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode as Wire;

    /// The URL as the topology reads it, then made ready to connect; either error, as text.
    fn parse(url: &str) -> Result<Target, String> {
        let url: DatabaseUrl = url.parse().map_err(|e: facepipe_core::database_url::DatabaseUrlError| e.to_string())?;
        Target::new(&url).map_err(|e| match e {
            TlsSetupError::RootCertRejected { .. } => format!("rejected: {e}"),
            TlsSetupError::NoSystemRoots(_) => format!("no roots: {e}"),
            e => e.to_string(),
        })
    }

    #[test]
    fn tokio_postgres_gets_a_mode_it_knows_and_the_rest_of_the_url() {
        for (params, wire) in [
            ("", Wire::Prefer),
            ("?sslmode=disable", Wire::Disable),
            ("?sslmode=prefer", Wire::Prefer),
            ("?sslmode=require", Wire::Require),
        ] {
            let target = parse(&format!("postgres://u:p@db.example.com:6543/app{params}")).unwrap();
            assert_eq!(target.config.get_ssl_mode(), wire, "{params}");
            assert_eq!(target.config.get_dbname(), Some("app"));
            assert_eq!(target.config.get_ports(), [6543]);
        }
        let target = parse("host=db.example.com dbname=app sslmode=verify-full sslrootcert=system connect_timeout=7").unwrap();
        assert_eq!(target.config.get_ssl_mode(), Wire::Require, "verify-* encrypt or fail");
        assert_eq!(target.config.get_connect_timeout(), Some(&std::time::Duration::from_secs(7)));
    }

    #[test]
    fn unusable_settings_are_permanent_errors_that_never_show_the_password() {
        let e = parse("postgres://u:hunter2@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem").err().unwrap();
        assert!(e.contains("sslrootcert /nonexistent/ca.pem: cannot read it"), "{e}");
        let e = parse("postgres://u:hunter2@h/db?sslmode=verify-full").err().unwrap();
        assert!(e.contains("needs sslrootcert") && !e.contains("hunter2"), "{e}");
        // An option tokio-postgres does not know is named, with its own reason.
        let e = parse("postgres://u:hunter2@h/db?sslmode=require&colour=blue").err().unwrap();
        assert!(e.contains("unknown option `colour`") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_ca_file_rustls_cannot_use_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n").unwrap();
        let e = parse(&format!("host=h sslmode=verify-ca sslrootcert={}", pem.display())).err().unwrap();
        assert!(e.starts_with("rejected: ") && e.contains("not a usable CA certificate"), "{e}");
    }

    #[test]
    fn system_roots_load_where_the_platform_has_them() {
        match parse("postgres://h/db?sslmode=verify-full&sslrootcert=system") {
            Ok(target) => assert_eq!(target.config.get_ssl_mode(), Wire::Require),
            Err(e) if e.starts_with("no roots: ") => {
                assert!(!Path::new("/etc/ssl/certs/ca-certificates.crt").exists(), "the roots are there but did not load")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
