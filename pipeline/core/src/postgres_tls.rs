//! TLS to PostgreSQL: the `sslmode` and `sslrootcert` of a `postgres.url`, read as libpq
//! reads them.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and refuses parameters it
//! does not know, so [`PgTls::split`] takes the TLS parameters out of the URL (both the
//! `postgres://...?sslmode=...` form and the `host=... sslmode=...` form) and returns the
//! rest for tokio-postgres. The runtime builds its rustls connector from [`PgTls`];
//! [`crate::database_url::DatabaseUrl`] reads the same values, so `pipeline validate`
//! and a connecting process agree.
//!
//! Nothing here echoes the URL: it may hold a password.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// How much TLS a connection insists on (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, plain text otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection. The certificate is checked only against a given `sslrootcert`.
    Require,
    /// TLS, with the server's certificate chain verified against `sslrootcert`; any host name.
    VerifyCa,
    /// TLS, with the chain verified and the host name matched against the certificate.
    VerifyFull,
}

impl SslMode {
    /// The value as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SslMode {
    type Err = PgTlsError;

    fn from_str(s: &str) -> Result<Self, PgTlsError> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            "allow" => return Err(PgTlsError::AllowUnsupported),
            other => return Err(PgTlsError::UnknownMode(other.to_string())),
        })
    }
}

/// The certificates a server's chain is verified against (libpq's `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: the connection is encrypted but the server is not authenticated.
    None,
    /// The chain up to a trusted root, whatever the host name.
    Chain,
    /// The chain and the host name.
    ChainAndHostName,
}

/// The TLS settings of one database URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTls {
    /// `sslmode` (default `prefer`, as libpq).
    pub mode: SslMode,
    /// `sslrootcert`, when given.
    pub root_cert: Option<RootCert>,
}

/// Why the TLS settings of a database URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// `sslmode` is not a value libpq knows.
    #[error("unknown sslmode `{0}`: use disable, prefer, require, verify-ca or verify-full")]
    UnknownMode(String),
    /// libpq's `allow` (plain first, TLS only when refused) has no tokio-postgres equivalent.
    #[error("sslmode=allow is not supported: use prefer (TLS when the server offers it) or require")]
    AllowUnsupported,
    /// A verifying mode without anything to verify against.
    #[error(
        "sslmode={0} verifies the server's certificate and needs sslrootcert: \
         the path of the CA's PEM file (sslrootcert=/path/ca.pem), or sslrootcert=system for the platform's roots"
    )]
    RootCertMissing(SslMode),
    /// The platform's roots vouch for any public name, so only the host name ties them to this server.
    #[error("sslrootcert=system needs sslmode=verify-full (it is sslmode={0}), as in libpq: the platform's roots vouch for any public host name")]
    SystemNeedsVerifyFull(SslMode),
    /// The `sslrootcert` file cannot be read.
    #[error("sslrootcert {path}: cannot read it: {source}")]
    RootCertUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The `sslrootcert` file is not PEM.
    #[error("sslrootcert {path}: not a PEM certificate file: {source}")]
    RootCertInvalid {
        /// The file.
        path: PathBuf,
        /// The PEM decoder's error.
        source: rustls_pki_types::pem::Error,
    },
    /// The `sslrootcert` file holds no certificate.
    #[error("sslrootcert {path}: holds no certificate (expected `-----BEGIN CERTIFICATE-----` blocks)")]
    RootCertEmpty {
        /// The file.
        path: PathBuf,
    },
    /// A libpq TLS parameter this pipeline does not implement (client certificates, CRLs, ...).
    #[error("`{0}` is not supported in the database URL (the TLS parameters understood are sslmode, sslrootcert and sslnegotiation)")]
    UnsupportedParameter(String),
    /// The connection string cannot be read.
    #[error("malformed database url: {0}")]
    Syntax(&'static str),
}

/// Parameters tokio-postgres understands itself and that are left in the URL.
const PASSED_THROUGH: &[&str] = &["sslnegotiation"];

impl PgTls {
    /// Reads `sslmode` and `sslrootcert` out of `url` (URL or key-value form) and returns
    /// them with the URL without them, for tokio-postgres. Checks that the mode and the
    /// root certificate go together, but does not read the certificate file.
    pub fn split(url: &str) -> Result<(Self, String), PgTlsError> {
        let (params, rest) = if let Some(body) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) {
            split_url(url, url.len() - body.len())?
        } else {
            split_key_value(url)?
        };
        let mut tls = Self::default();
        for (key, value) in params {
            match key.as_str() {
                "sslmode" => tls.mode = value.parse()?,
                "sslrootcert" => {
                    tls.root_cert = match value.as_str() {
                        "" => None,
                        "system" => Some(RootCert::System),
                        path => Some(RootCert::File(PathBuf::from(path))),
                    }
                }
                other => return Err(PgTlsError::UnsupportedParameter(other.to_string())),
            }
        }
        tls.check()?;
        Ok((tls, rest))
    }

    /// Checks that the mode and the root certificate go together (no file is read).
    fn check(&self) -> Result<(), PgTlsError> {
        match (&self.root_cert, self.mode) {
            (None, mode @ (SslMode::VerifyCa | SslMode::VerifyFull)) => Err(PgTlsError::RootCertMissing(mode)),
            (Some(RootCert::System), SslMode::VerifyFull | SslMode::Disable) => Ok(()),
            (Some(RootCert::System), mode) => Err(PgTlsError::SystemNeedsVerifyFull(mode)),
            _ => Ok(()),
        }
    }

    /// What is checked of the server's certificate. As in libpq, `prefer` and `require`
    /// verify the chain when `sslrootcert` is given, and nothing otherwise.
    pub fn verification(&self) -> Verification {
        match (self.mode, &self.root_cert) {
            (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => Verification::None,
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(_)) => Verification::Chain,
            (SslMode::VerifyCa, None) => Verification::Chain, // refused by `check`
            (SslMode::VerifyFull, _) => Verification::ChainAndHostName,
        }
    }

    /// Checks everything that can be checked without a server: the values, and that an
    /// `sslrootcert` file holds at least one PEM certificate.
    pub fn validate(url: &str) -> Result<Self, PgTlsError> {
        let (tls, _) = Self::split(url)?;
        tls.check_files()?;
        Ok(tls)
    }

    /// Checks that an `sslrootcert` file holds at least one PEM certificate (unless TLS is off).
    pub fn check_files(&self) -> Result<(), PgTlsError> {
        if let (Some(RootCert::File(path)), true) = (&self.root_cert, self.mode != SslMode::Disable) {
            load_pem_certificates(path)?;
        }
        Ok(())
    }
}

/// The certificates of a PEM file; an error unless it holds at least one.
pub fn load_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    use rustls_pki_types::pem::Error as PemError;
    let wrap = |e: PemError| match e {
        PemError::Io(source) => PgTlsError::RootCertUnreadable { path: path.to_path_buf(), source },
        source => PgTlsError::RootCertInvalid { path: path.to_path_buf(), source },
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(wrap)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(wrap)?;
    if certs.is_empty() {
        return Err(PgTlsError::RootCertEmpty { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// Whether a parameter is one of the TLS ones handled here (the others `ssl*` are refused).
fn is_tls_parameter(key: &str) -> bool {
    key.starts_with("ssl") && !PASSED_THROUGH.contains(&key)
}

/// `postgres://[user[:password]@]host[:port][/db][?k=v&...]`: the TLS parameters of the
/// query, and the URL without them. The query starts as tokio-postgres finds it: at the
/// first `?` after the first `@` (its parser takes everything up to the first `@` as the
/// credentials).
fn split_url(url: &str, prefix_len: usize) -> Result<(Vec<(String, String)>, String), PgTlsError> {
    let body = &url[prefix_len..];
    let after_credentials = body.find('@').map_or(0, |at| at + 1);
    let Some(q) = body[after_credentials..].find('?').map(|q| prefix_len + after_credentials + q) else {
        return Ok((Vec::new(), url.to_string()));
    };
    let (head, query) = (&url[..q], &url[q + 1..]);
    let (mut tls, mut kept) = (Vec::new(), Vec::new());
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').ok_or(PgTlsError::Syntax("a query parameter without `=`"))?;
        let key = decode(key)?;
        if is_tls_parameter(&key) {
            tls.push((key, decode(value)?));
        } else {
            kept.push(param);
        }
    }
    let rest = if kept.is_empty() { head.to_string() } else { format!("{head}?{}", kept.join("&")) };
    Ok((tls, rest))
}

fn decode(s: &str) -> Result<String, PgTlsError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| PgTlsError::Syntax("a query parameter is not percent-encoded UTF-8"))
}

/// `key=value key='quoted value' ...` (libpq's key-value form, as tokio-postgres reads it):
/// the TLS parameters, and the string without them (the others kept byte for byte).
fn split_key_value(s: &str) -> Result<(Vec<(String, String)>, String), PgTlsError> {
    let mut chars = s.char_indices().peekable();
    let (mut tls, mut rest) = (Vec::new(), String::new());
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else { break };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &s[start..key_end];
        skip_ws(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(PgTlsError::Syntax("a parameter without `=`"));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut end = s.len();
        let mut closed = !quoted;
        while let Some(&(i, c)) = chars.peek() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                if quoted {
                    chars.next();
                    closed = true;
                }
                end = if quoted { i + 1 } else { i };
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if !closed {
            return Err(PgTlsError::Syntax("an unterminated quoted value"));
        }
        if is_tls_parameter(key) {
            tls.push((key.to_string(), value));
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&s[start..end]);
        }
    }
    Ok((tls, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (PgTls, String) {
        PgTls::split(url).unwrap()
    }

    #[test]
    fn urls_without_tls_parameters_pass_unchanged_and_prefer_tls() {
        for url in [
            "postgres://facepipe:facepipe@127.0.0.1:5432/facepipe",
            "postgresql://u@h/db?application_name=x&connect_timeout=3",
            "host=127.0.0.1 user=u dbname='my db'",
        ] {
            let (tls, rest) = split(url);
            assert_eq!(tls, PgTls { mode: SslMode::Prefer, root_cert: None });
            assert_eq!(rest, url);
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_a_url() {
        let (tls, rest) = split("postgres://u:p@db.example.com:5432/app?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCert::File("/etc/ca.pem".into())));
        assert_eq!(rest, "postgres://u:p@db.example.com:5432/app?application_name=a&connect_timeout=3");
        let (tls, rest) = split("postgres://u@h/db?sslmode=require");
        assert_eq!((tls.mode, tls.root_cert), (SslMode::Require, None));
        assert_eq!(rest, "postgres://u@h/db");
        // sslnegotiation is tokio-postgres's own and stays.
        let (_, rest) = split("postgres://h/db?sslmode=require&sslnegotiation=direct");
        assert_eq!(rest, "postgres://h/db?sslnegotiation=direct");
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_the_query() {
        let (tls, rest) = split("postgres://u:pa?ss@h/db?sslmode=disable");
        assert_eq!(tls.mode, SslMode::Disable);
        assert_eq!(rest, "postgres://u:pa?ss@h/db");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_a_key_value_string() {
        let (tls, rest) = split("host=db user=u sslmode = verify-ca  sslrootcert='/my certs/ca\\'s.pem' password='a b'");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert, Some(RootCert::File("/my certs/ca's.pem".into())));
        assert_eq!(rest, "host=db user=u password='a b'");
        let (tls, rest) = split("sslmode=verify-full sslrootcert=system host=db");
        assert_eq!((tls.mode, tls.root_cert), (SslMode::VerifyFull, Some(RootCert::System)));
        assert_eq!(rest, "host=db");
        assert!(matches!(PgTls::split("host=db sslmode='require"), Err(PgTlsError::Syntax(_))));
    }

    #[test]
    fn bad_or_inconsistent_values_are_refused_with_the_reason() {
        let err = |url: &str| PgTls::split(url).unwrap_err().to_string();
        assert_eq!(err("postgres://h/db?sslmode=verify"), "unknown sslmode `verify`: use disable, prefer, require, verify-ca or verify-full");
        assert!(err("postgres://h/db?sslmode=allow").contains("not supported"));
        assert!(err("postgres://h/db?sslmode=verify-full").starts_with("sslmode=verify-full verifies the server's certificate and needs sslrootcert"));
        assert!(err("host=h sslmode=verify-ca").contains("needs sslrootcert"));
        assert!(err("postgres://h/db?sslmode=require&sslrootcert=system").contains("needs sslmode=verify-full"));
        assert!(err("postgres://h/db?sslcert=/c.pem").starts_with("`sslcert` is not supported"));
        // A password never appears in a message.
        assert!(!err("postgres://u:hunter2@h/db?sslmode=bogus").contains("hunter2"));
    }

    #[test]
    fn what_each_mode_verifies() {
        let v = |url: &str| split(url).0.verification();
        assert_eq!(v("postgres://h/db?sslmode=disable&sslrootcert=/ca.pem"), Verification::None);
        assert_eq!(v("postgres://h/db"), Verification::None);
        assert_eq!(v("postgres://h/db?sslmode=require"), Verification::None);
        assert_eq!(v("postgres://h/db?sslmode=require&sslrootcert=/ca.pem"), Verification::Chain);
        assert_eq!(v("postgres://h/db?sslmode=prefer&sslrootcert=/ca.pem"), Verification::Chain);
        assert_eq!(v("postgres://h/db?sslmode=verify-ca&sslrootcert=/ca.pem"), Verification::Chain);
        assert_eq!(v("postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem"), Verification::ChainAndHostName);
        assert_eq!(v("postgres://h/db?sslmode=verify-full&sslrootcert=system"), Verification::ChainAndHostName);
    }

    #[test]
    fn validation_reads_the_root_certificate_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let url = format!("postgres://h/db?sslmode=verify-full&sslrootcert={}", missing.display());
        assert!(matches!(PgTls::validate(&url), Err(PgTlsError::RootCertUnreadable { .. })));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!("postgres://h/db?sslmode=verify-ca&sslrootcert={}", empty.display());
        let e = PgTls::validate(&url).unwrap_err();
        assert!(matches!(e, PgTlsError::RootCertEmpty { .. }), "{e}");
        // A certificate (any DER in a CERTIFICATE block parses as PEM here; rustls checks it).
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n").unwrap();
        let url = format!("host=h sslmode=verify-full sslrootcert={}", pem.display());
        assert_eq!(PgTls::validate(&url).unwrap().root_cert, Some(RootCert::File(pem)));
        // `disable` ignores the file, as libpq does.
        let url = format!("postgres://h/db?sslmode=disable&sslrootcert={}", missing.display());
        PgTls::validate(&url).unwrap();
    }
}
