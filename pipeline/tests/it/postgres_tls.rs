//! TLS to PostgreSQL (`sslmode`, `sslrootcert` in `postgres.url`), against real servers
//! this test starts: `initdb` in a temporary directory, then `postgres` on a free loopback
//! port, one with `ssl=on` and a certificate for `localhost` and 127.0.0.1 signed by a CA
//! the test makes (rcgen), one with `ssl=off`. Every case goes through the pipeline's own
//! code: `Db::connect` and its migrations, `ensure_database`, `connect_one`.
//!
//! PostgreSQL's binaries: `$PIPELINE_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package, which `scripts/setup` installs), else `PATH`. As root,
//! `initdb` and `postgres` run as the `postgres` user (they refuse to run as root).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use facepipe_ledger::{self as db, Db, DbError};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// The superuser `initdb` makes; trusted on loopback, so no password is involved.
const USER: &str = "tls_test";

/// A database URL of the test's, typed.
fn parsed(url: &str) -> facepipe_core::database_url::DatabaseUrl {
    url.parse().unwrap_or_else(|e| panic!("{e}"))
}

/// A CA made by the test: its PEM file, and what signs with it.
struct Ca {
    pem: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// Makes a CA named `facepipe test CA`. Two CAs made by this have the same name, so a
/// server certificate from one fails against the other by its signature, not by its name.
fn make_ca(dir: &Path, file: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "facepipe test CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = dir.join(file);
    std::fs::write(&pem, cert.pem()).unwrap();
    Ca { pem, issuer: Issuer::new(params, key) }
}

/// Writes `server.crt` and `server.key` for `localhost` and 127.0.0.1, signed by `ca`.
fn make_server_cert(dir: &Path, ca: &Ca) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let (crt, key_file) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    // PostgreSQL refuses a key others can read.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (crt, key_file)
}

/// Where `initdb` and `postgres` are.
fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PIPELINE_PG_BIN") {
        return Some(dir.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn pg_command(name: &str) -> Command {
    let program = pg_bin_dir().map(|d| d.join(name)).unwrap_or_else(|| name.into());
    Command::new(program)
}

/// The `postgres` user's ids when the test runs as root (PostgreSQL will not run as root).
fn server_user() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!entry.is_null(), "running as root needs a `postgres` user to run PostgreSQL as (Debian's postgresql package makes it)");
    let entry = unsafe { &*entry };
    Some((entry.pw_uid, entry.pw_gid))
}

/// A PostgreSQL server of the test's own, stopped and removed on drop (also when the
/// test fails).
struct PgServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl PgServer {
    /// `initdb` and start a server; `ssl` holds the certificate and key when TLS is on.
    async fn start(ssl: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let user = server_user();
        let as_server = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
            cmd.current_dir(dir.path());
        };
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let mut files = vec![dir.path().to_path_buf()];
        let ssl_args = match ssl {
            Some((crt, key)) => {
                let (server_crt, server_key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
                std::fs::copy(crt, &server_crt).unwrap();
                std::fs::copy(key, &server_key).unwrap();
                files.extend([server_crt.clone(), server_key.clone()]);
                vec!["ssl=on".to_string(), format!("ssl_cert_file={}", server_crt.display()), format!("ssl_key_file={}", server_key.display())]
            }
            None => vec!["ssl=off".to_string()],
        };
        if let Some((uid, gid)) = user {
            for f in &files {
                std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut initdb = pg_command("initdb");
        initdb.args(["--auth=trust", "--no-sync", "--no-instructions", "--encoding=UTF8", "--username", USER, "-D"]).arg(&data);
        as_server(&mut initdb);
        let out = initdb.output().unwrap_or_else(|e| panic!("initdb ({e}): install PostgreSQL (scripts/setup) or set PIPELINE_PG_BIN"));
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));

        let port = crate::support::free_port();
        let mut postgres = pg_command("postgres");
        postgres.arg("-D").arg(&data);
        let settings = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={port}"),
            format!("unix_socket_directories={}", dir.path().display()),
            "fsync=off".to_string(),
            "max_connections=20".to_string(),
        ];
        for setting in settings.iter().chain(&ssl_args) {
            postgres.args(["-c", setting]);
        }
        postgres.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        as_server(&mut postgres);
        let child = postgres.spawn().expect("start postgres");
        let server = Self { child: Some(child), port, dir };
        server.wait_ready().await;
        server
    }

    /// Waits until the server accepts a session (not only the port: it may still be starting up).
    async fn wait_ready(&self) {
        let url = self.url("postgres", "sslmode=disable");
        let start = Instant::now();
        loop {
            match db::connect_one(&parsed(&url)).await {
                Ok(_) => return,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    panic!("PostgreSQL did not start: {e}\n{}", self.log())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A URL to `database` on 127.0.0.1 with these query parameters.
    fn url(&self, database: &str, params: &str) -> String {
        self.url_for_host("127.0.0.1", database, params)
    }

    fn url_for_host(&self, host: &str, database: &str, params: &str) -> String {
        format!("postgres://{USER}@{host}:{}/{database}?{params}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is PostgreSQL's fast shutdown. SIGTERM ("smart") would wait for every
            // session to end, and this test's own sessions may still be open on a runtime
            // that cannot run while this drop blocks it.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            if crate::support::wait_exit(&mut child, Duration::from_secs(10)).is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// How many client sessions on `url`'s database are encrypted, and how many are not, as
/// the server sees them (`pg_stat_ssl`), asked over a connection made with `url`.
async fn sessions(url: &str) -> (i64, i64) {
    let client = db::connect_one(&parsed(url)).await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'client backend' AND a.datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Whether this connection's own session is encrypted, as the server sees it.
async fn own_session_encrypted(url: &str) -> Result<bool, DbError> {
    let client = db::connect_one(&parsed(url)).await?;
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?;
    Ok(row.get(0))
}

/// The error connecting and migrating through the pool with `url` gives; panics if it connects.
async fn refusal(url: &str) -> DbError {
    let pool = Db::connect(&parsed(&url), 1).expect("the URL is valid");
    match pool.migrate().await {
        Ok(_) => panic!("connected, but should have been refused: {}", parsed(url)),
        Err(e) => e,
    }
}

#[tokio::test]
async fn tls_server_modes() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca.pem");
    let other_ca = make_ca(certs.path(), "other-ca.pem");
    let (crt, key) = make_server_cert(certs.path(), &ca);
    let server = PgServer::start(Some((&crt, &key))).await;
    let (ca, other_ca) = (ca.pem.display().to_string(), other_ca.pem.display().to_string());

    // 1. verify-full with the right CA, by the name in the certificate: the database is
    //    created, migrated and used through TLS, and every session the server has is encrypted.
    let url = server.url_for_host("localhost", "facepipe", &format!("sslmode=verify-full&sslrootcert={ca}"));
    assert!(db::ensure_database(&parsed(&url)).await.unwrap(), "ensure_database creates the database over TLS");
    let pool = Db::connect(&parsed(&url), 2).unwrap();
    assert!(!pool.migrate().await.unwrap().is_empty(), "migrations run over TLS");
    pool.ping().await.unwrap();
    assert!(own_session_encrypted(&url).await.unwrap(), "verify-full: the server sees an encrypted session");
    let (encrypted, plain) = sessions(&url).await;
    assert!(encrypted >= 2 && plain == 0, "the pool's sessions are encrypted: {encrypted} encrypted, {plain} plain");
    // By address too: the certificate names 127.0.0.1.
    let by_ip = server.url("facepipe", &format!("sslmode=verify-full&sslrootcert={ca}"));
    assert!(own_session_encrypted(&by_ip).await.unwrap());
    drop(pool);

    // 2. A CA that did not sign the server's certificate (same name, other key) is refused,
    //    whether the pool, ensure_database or verify-ca connects, and by require with it.
    // (By address: "localhost" may also resolve to ::1, where nothing listens, and
    // tokio-postgres reports the last address's error.)
    let wrong = server.url("facepipe", &format!("sslmode=verify-full&sslrootcert={other_ca}"));
    let e = refusal(&wrong).await;
    assert!(matches!(e, DbError::CertificateNotVerified { .. }), "{e:?}");
    let message = e.to_string();
    assert!(message.contains("the server's certificate could not be verified"), "{message}");
    assert!(message.contains("not signed by a CA in sslrootcert"), "{message}");
    let e = db::ensure_database(&parsed(&wrong)).await.unwrap_err();
    assert!(matches!(e, DbError::CertificateNotVerified { .. }), "ensure_database: {e}");
    for mode in ["verify-ca", "require"] {
        let url = server.url("facepipe", &format!("sslmode={mode}&sslrootcert={other_ca}"));
        let e = refusal(&url).await;
        assert!(matches!(e, DbError::CertificateNotVerified { .. }), "{mode} with the wrong CA: {e}");
    }

    // 3. A host name the certificate does not name: verify-full refuses it, verify-ca
    //    (chain only) accepts it. The name is connected to through hostaddr.
    let elsewhere = |mode: &str| {
        server.url_for_host("db.elsewhere.test", "facepipe", &format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}"))
    };
    let e = refusal(&elsewhere("verify-full")).await;
    let message = e.to_string();
    assert!(matches!(e, DbError::CertificateNotVerified { .. }), "{e:?}");
    assert!(message.contains("not valid for the host name db.elsewhere.test"), "{message}");
    let pool = Db::connect(&parsed(&elsewhere("verify-ca")), 1).unwrap();
    pool.migrate().await.expect("verify-ca does not check the host name");
    assert!(own_session_encrypted(&elsewhere("verify-ca")).await.unwrap());
    drop(pool);

    // 5. require without sslrootcert: encrypted, the certificate unverified (as libpq), so
    //    even the unknown name connects; disable stays plain on the same server.
    let require = server.url_for_host("db.elsewhere.test", "facepipe", "hostaddr=127.0.0.1&sslmode=require");
    let pool = Db::connect(&parsed(&require), 1).unwrap();
    pool.migrate().await.unwrap();
    assert!(own_session_encrypted(&require).await.unwrap(), "require encrypts");
    assert!(!own_session_encrypted(&server.url("facepipe", "sslmode=disable")).await.unwrap(), "disable stays plain");
    // No sslmode: prefer, as libpq, so TLS whenever the server offers it.
    assert!(own_session_encrypted(&server.url("facepipe", "application_name=x")).await.unwrap(), "prefer is the default");
}

#[tokio::test]
async fn server_without_tls() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca.pem");
    let server = PgServer::start(None).await;
    let ca = ca.pem.display().to_string();

    // 4. require (and verify-full) refuse a server that does not offer TLS, saying so;
    //    prefer connects to it in plain text.
    for params in ["sslmode=require".to_string(), format!("sslmode=verify-full&sslrootcert={ca}")] {
        let url = server.url("postgres", &params);
        let e = refusal(&url).await;
        assert!(matches!(e, DbError::ServerWithoutTls(_)), "{params}: {e:?}");
        assert!(e.to_string().contains("the server does not support TLS"), "{e}");
        let e = db::connect_one(&parsed(&url)).await.unwrap_err();
        assert!(matches!(e, DbError::ServerWithoutTls(_)), "connect_one, {params}: {e}");
    }
    let prefer = server.url("postgres", "sslmode=prefer");
    let pool = Db::connect(&parsed(&prefer), 1).unwrap();
    pool.migrate().await.expect("prefer falls back to plain text");
    assert!(!own_session_encrypted(&prefer).await.unwrap(), "prefer: plain text when the server has no TLS");
    let (encrypted, plain) = sessions(&prefer).await;
    assert!(encrypted == 0 && plain >= 2, "{encrypted} encrypted, {plain} plain");
}

/// `pipeline validate` names a bad sslmode, and a verify mode without a usable CA file,
/// without printing the URL's password.
#[test]
fn validate_checks_the_database_tls_settings() {
    let dir = tempfile::tempdir().unwrap();
    let topology = std::fs::read_to_string(crate::support::repo_root().join("topology.toml")).unwrap();
    let validate = |url: &str| {
        let path = dir.path().join("topology.toml");
        std::fs::write(&path, &topology).unwrap();
        let out = Command::new(crate::support::bin("pipeline"))
            .args(["validate"])
            .arg(&path)
            .env("PIPELINE_DATABASE_URL", url)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = validate("postgres://u:pg-secret@db.example.com/facepipe?sslmode=verify");
    assert!(!ok && out.contains("postgres.url") && out.contains("unknown sslmode `verify`"), "{out}");
    assert!(!out.contains("pg-secret"), "{out}");
    let (ok, out) = validate("postgres://u@db.example.com/facepipe?sslmode=verify-full");
    assert!(!ok && out.contains("needs sslrootcert"), "{out}");
    let missing = dir.path().join("missing.pem");
    let (ok, out) = validate(&format!("postgres://u@db.example.com/facepipe?sslmode=verify-ca&sslrootcert={}", missing.display()));
    assert!(!ok && out.contains("cannot read it"), "{out}");
    let ca = make_ca(dir.path(), "ca.pem");
    let (ok, out) = validate(&format!("postgres://u@db.example.com/facepipe?sslmode=verify-full&sslrootcert={}", ca.pem.display()));
    assert!(ok, "{out}");
}
