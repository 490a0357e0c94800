//! `postgres.url`, read into typed settings, so that its password is a field
//! that sharing and printing leave out rather than text that must be found.
//!
//! libpq accepts a password in four places: the URL's userinfo
//! (`postgres://u:pw@h/db`), its query (`?password=pw`), the keyword form
//! (`password=pw`) and, in that form, quoted (`password='a b'`).
//! tokio-postgres reads all four into one field of its [`tokio_postgres::Config`];
//! a [`DatabaseUrl`] keeps that config (for connecting) and its TLS settings
//! ([`PgTls`]), and renders itself (`Display`, `Debug`, `Serialize`) from the
//! typed fields without the password, always as a URL.

use std::fmt;
use std::str::FromStr;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio_postgres::config::{ChannelBinding, Host, LoadBalanceHosts, SslNegotiation, TargetSessionAttrs};

use crate::postgres_tls::{PgTls, PgTlsError, RootCert, SslMode};
use crate::secret::Secret;

/// Where outcomes are recorded: a PostgreSQL connection string (URL or keyword form), parsed.
#[derive(Clone, PartialEq)]
pub struct DatabaseUrl {
    /// tokio-postgres's settings, the password included, without the TLS parameters it does not know.
    config: tokio_postgres::Config,
    /// `sslmode` and `sslrootcert`, as libpq reads them.
    tls: PgTls,
}

/// Why a database URL cannot be read. Never holds the URL: it may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    /// `sslmode`, `sslrootcert` or another TLS parameter cannot be used.
    #[error(transparent)]
    Tls(#[from] PgTlsError),
    /// tokio-postgres does not accept the connection string.
    #[error("not a PostgreSQL connection string: {0}")]
    Syntax(String),
}

impl DatabaseUrl {
    /// tokio-postgres's settings, password included: what a connection is opened with.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS settings (`sslmode`, `sslrootcert`).
    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// True when a password is set (in whichever form it was given).
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// Sets the password (`PIPELINE_DATABASE_PASSWORD`).
    pub fn set_password(&mut self, password: &Secret) {
        self.config.password(password.expose());
    }

    /// The database name, when one is given.
    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, name: &str) -> Self {
        let mut other = self.clone();
        other.config.dbname(name);
        other
    }

    /// Checks what can be checked without a server: that an `sslrootcert` file holds a certificate.
    pub fn check_files(&self) -> Result<(), PgTlsError> {
        self.tls.check_files()
    }
}

/// Everything but the letters, digits and `-._~` is percent-encoded in a rendered URL.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn encode(s: &str) -> impl fmt::Display + '_ {
    utf8_percent_encode(s, COMPONENT)
}

/// The URL without its password: `postgres://user@host:port/db?param=value&...`.
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (c, defaults) = (&self.config, tokio_postgres::Config::new());
        f.write_str("postgres://")?;
        if let Some(user) = c.get_user() {
            write!(f, "{}@", encode(user))?;
        }
        let (hosts, ports) = (c.get_hosts(), c.get_ports());
        for (i, host) in hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match host {
                Host::Tcp(name) if name.contains(':') => write!(f, "[{name}]")?,
                Host::Tcp(name) => write!(f, "{}", encode(name))?,
                Host::Unix(path) => write!(f, "{}", encode(&path.to_string_lossy()))?,
            }
            if let Some(port) = ports.get(i).or(if ports.len() == 1 { ports.first() } else { None }) {
                write!(f, ":{port}")?;
            }
        }
        f.write_str("/")?;
        if let Some(db) = c.get_dbname() {
            write!(f, "{}", encode(db))?;
        }
        let mut params: Vec<(&str, String)> = Vec::new();
        let mut param = |key, value: String| params.push((key, value));
        if let Some(options) = c.get_options() {
            param("options", options.to_string());
        }
        if let Some(name) = c.get_application_name() {
            param("application_name", name.to_string());
        }
        if self.tls.mode != SslMode::default() {
            param("sslmode", self.tls.mode.to_string());
        }
        match &self.tls.root_cert {
            Some(RootCert::System) => param("sslrootcert", "system".into()),
            Some(RootCert::File(path)) => param("sslrootcert", path.to_string_lossy().into_owned()),
            None => {}
        }
        if c.get_ssl_negotiation() == SslNegotiation::Direct {
            param("sslnegotiation", "direct".into());
        }
        if !c.get_hostaddrs().is_empty() {
            param("hostaddr", c.get_hostaddrs().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","));
        }
        if hosts.is_empty() && !ports.is_empty() {
            param("port", ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","));
        }
        if let Some(t) = c.get_connect_timeout() {
            param("connect_timeout", t.as_secs().to_string());
        }
        if let Some(t) = c.get_tcp_user_timeout() {
            param("tcp_user_timeout", t.as_secs().to_string());
        }
        if !c.get_keepalives() {
            param("keepalives", "0".into());
        }
        if c.get_keepalives_idle() != defaults.get_keepalives_idle() {
            param("keepalives_idle", c.get_keepalives_idle().as_secs().to_string());
        }
        if let Some(t) = c.get_keepalives_interval() {
            param("keepalives_interval", t.as_secs().to_string());
        }
        if let Some(n) = c.get_keepalives_retries() {
            param("keepalives_retries", n.to_string());
        }
        match c.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => param("target_session_attrs", "read-write".into()),
            TargetSessionAttrs::ReadOnly => param("target_session_attrs", "read-only".into()),
            _ => {}
        }
        match c.get_channel_binding() {
            ChannelBinding::Disable => param("channel_binding", "disable".into()),
            ChannelBinding::Require => param("channel_binding", "require".into()),
            _ => {}
        }
        if c.get_load_balance_hosts() == LoadBalanceHosts::Random {
            param("load_balance_hosts", "random".into());
        }
        for (i, (key, value)) in params.iter().enumerate() {
            write!(f, "{}{key}={}", if i == 0 { "?" } else { "&" }, encode(value))?;
        }
        Ok(())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"{}", if self.has_password() { " (password ***)" } else { "" })
    }
}

impl FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    /// Reads libpq's URL (`postgres://...`, `postgresql://...`) or keyword form (`host=... dbname=...`).
    fn from_str(s: &str) -> Result<Self, DatabaseUrlError> {
        let (tls, rest) = PgTls::split(s)?;
        let config = rest.parse::<tokio_postgres::Config>().map_err(|e| DatabaseUrlError::Syntax(chain(&e)))?;
        Ok(Self { config, tls })
    }
}

/// tokio-postgres's error with its causes (its `Display` shows only the kind); none holds the URL.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

impl serde::Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "Sup3r Secret'Pw";

    fn url(s: &str) -> DatabaseUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// Every form libpq accepts a password in: parsed, connected with, never rendered.
    #[test]
    fn every_form_of_password_is_kept_for_connecting_and_never_rendered() {
        let encoded = "Sup3r%20Secret%27Pw";
        for text in [
            format!("postgres://facepipe:{encoded}@127.0.0.1:5432/facepipe"),
            format!("postgresql://facepipe@127.0.0.1/facepipe?password={encoded}&sslmode=disable"),
            "host=127.0.0.1 user=facepipe password='Sup3r Secret\\'Pw' dbname=facepipe".to_string(),
            "host=127.0.0.1 user=facepipe password=Sup3rSecretPw dbname=facepipe".to_string(),
            "host = 127.0.0.1   password = 'Sup3r Secret\\'Pw'  dbname='face pipe'".to_string(),
        ] {
            let u = url(&text);
            let password = String::from_utf8(u.config().get_password().unwrap().to_vec()).unwrap();
            assert!(password == SECRET || password == "Sup3rSecretPw", "{text}: {password}");
            for shown in [u.to_string(), format!("{u:?}"), serde_json::to_string(&u).unwrap()] {
                assert!(!shown.contains("Sup3r") && !shown.contains("password="), "{text} shown as {shown}");
            }
            // What is shown is itself a URL for the same server, without the password.
            let again = url(&u.to_string());
            assert!(!again.has_password());
            assert_eq!(again.config().get_hosts(), u.config().get_hosts());
            assert_eq!(again.dbname(), u.dbname());
            assert_eq!(again.tls(), u.tls());
        }
    }

    #[test]
    fn renders_every_setting_back_as_a_url() {
        let u = url("host=db1,db2 port=5433,5434 user='ann marie' dbname=pipe application_name=fp \
                     sslmode=verify-full sslrootcert=/etc/ca.pem connect_timeout=3 target_session_attrs=read-write");
        let shown = u.to_string();
        assert_eq!(
            shown,
            "postgres://ann%20marie@db1:5433,db2:5434/pipe?application_name=fp&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3&target_session_attrs=read-write"
        );
        assert_eq!(url(&shown), u, "the rendering reads back as the same settings");
        // A socket directory is a percent-encoded host; the URL form adds the default port.
        let unix = url("host=/var/run/postgresql dbname=x");
        assert_eq!(url(&unix.to_string()).config().get_hosts(), unix.config().get_hosts());
        let v6 = url("postgres://[::1]:5432/x");
        assert_eq!(v6.to_string(), "postgres://[::1]:5432/x");
    }

    #[test]
    fn errors_never_hold_the_url() {
        for bad in ["postgres://u:pw-77@h/db?sslmode=bogus", "host=h password=pw-77 port=notaport", "host=h password='pw-77"] {
            let e = bad.parse::<DatabaseUrl>().unwrap_err().to_string();
            assert!(!e.contains("pw-77"), "{e}");
        }
    }

    #[test]
    fn a_password_can_be_set_apart_from_the_url() {
        let mut u = url("postgres://facepipe@db/facepipe");
        assert!(!u.has_password());
        u.set_password(&Secret::new("from-env"));
        assert_eq!(u.config().get_password(), Some(&b"from-env"[..]));
        assert_eq!(u.to_string(), "postgres://facepipe@db:5432/facepipe");
        assert_eq!(u.with_dbname("postgres").dbname(), Some("postgres"));
    }
}
