//! NATS authentication and TLS from topology and environment, against a real
//! nats-server that requires them; and no secret in any output.

use std::process::{Command, Output, Stdio};

use facepipe_core::topology::StageName;

use crate::support::{bin, test_topology, NatsServer, TestDb};

/// Runs `pipeline <args>` with a topology for `nats_url` and extra environment.
fn pipeline_cli(dir: &std::path::Path, nats_url: &str, db_url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let topology = test_topology(nats_url, db_url, &dir.join("objects"));
    let path = dir.join("topology.toml");
    // Written as an operator writes it: `nats.url` as given, credentials and all (a
    // topology serializes without them).
    let text = topology.to_toml().replace(&format!("url = \"{}\"", topology.nats.url), &format!("url = {}", toml::Value::from(nats_url)));
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(bin("pipeline"));
    cmd.arg("--topology").arg(&path).args(args);
    for var in ["PIPELINE_NATS_USER", "PIPELINE_NATS_PASSWORD", "PIPELINE_NATS_TOKEN", "PIPELINE_NATS_CREDS", "PIPELINE_NATS_URL", "PIPELINE_DATABASE_URL"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn user_and_password_are_required_and_never_shown() {
    let nats = NatsServer::start_with_args(&["--user", "facepipe", "--pass", "nats-s3cret"]);
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();

    let refused = pipeline_cli(dir.path(), &nats.url, &db.url, &[], &["apply"]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("authorization violation"), "a clear reason: {}", text(&refused));

    let wrong = [("PIPELINE_NATS_USER", "facepipe"), ("PIPELINE_NATS_PASSWORD", "not-it-42")];
    let out = pipeline_cli(dir.path(), &nats.url, &db.url, &wrong, &["apply"]);
    assert!(!out.status.success());
    assert!(!text(&out).contains("not-it-42"), "the password is never printed: {}", text(&out));

    let right = [("PIPELINE_NATS_USER", "facepipe"), ("PIPELINE_NATS_PASSWORD", "nats-s3cret")];
    let out = pipeline_cli(dir.path(), &nats.url, &db.url, &right, &["apply"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("nats-s3cret"));

    // Credentials in the URL work too, and are redacted from errors.
    let in_url = nats.url.replace("nats://", "nats://facepipe:wrong-pw-7@");
    let out = pipeline_cli(dir.path(), &in_url, &db.url, &[], &["apply", "--dry-run"]);
    assert!(!out.status.success());
    assert!(!text(&out).contains("wrong-pw-7"), "{}", text(&out));
    let good_url = nats.url.replace("nats://", "nats://facepipe:nats-s3cret@");
    assert!(pipeline_cli(dir.path(), &good_url, &db.url, &[], &["apply", "--dry-run"]).status.success());

    // A stage without credentials is refused at once with the reason, not retried forever.
    let topology = test_topology(&nats.url, &db.url, &dir.path().join("objects"));
    let path = dir.path().join("stage.toml");
    std::fs::write(&path, toml::to_string(&topology).unwrap()).unwrap();
    let out = Command::new(bin("detect")).arg("--topology").arg(&path).env_remove("PIPELINE_NATS_PASSWORD").output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("authorization violation"), "{}", text(&out));
}

#[tokio::test]
async fn token_authentication() {
    let nats = NatsServer::start_with_args(&["--auth", "tok-9f8e7d"]);
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    assert!(!pipeline_cli(dir.path(), &nats.url, &db.url, &[], &["apply", "--dry-run"]).status.success());
    let out = pipeline_cli(dir.path(), &nats.url, &db.url, &[("PIPELINE_NATS_TOKEN", "tok-9f8e7d")], &["apply", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("tok-9f8e7d"));
}

#[tokio::test]
async fn tls_with_the_servers_ca() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    // A CA, and a server certificate it signs (rustls refuses a CA certificate as the server's).
    let steps: [Vec<String>; 3] = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca", "-keyout", &p("ca.key"), "-out", &p("ca.pem")].map(String::from).to_vec(),
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", &p("key.pem"), "-out", &p("server.csr")].map(String::from).to_vec(),
        ["x509", "-req", "-in", &p("server.csr"), "-CA", &p("ca.pem"), "-CAkey", &p("ca.key"), "-CAcreateserial", "-days", "1", "-extfile", &p("san.ext"), "-out", &p("cert.pem")].map(String::from).to_vec(),
    ];
    for args in steps {
        let made = Command::new("openssl").args(&args).output().expect("openssl");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    }
    let (cert, key, ca) = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ca.pem"));
    let nats = NatsServer::start_with_args(&["--tls", "--tlscert", cert.to_str().unwrap(), "--tlskey", key.to_str().unwrap()]);
    let db = TestDb::create().await;

    // Without the CA the server's certificate is not trusted.
    let out = pipeline_cli(dir.path(), &nats.url, &db.url, &[], &["apply", "--dry-run"]);
    assert!(!out.status.success(), "{}", text(&out));

    let mut topology = test_topology(&nats.url, &db.url, &dir.path().join("objects"));
    topology.nats.auth.tls_ca = Some(ca);
    topology.nats.auth.tls_required = true;
    let path = dir.path().join("tls.toml");
    std::fs::write(&path, toml::to_string(&topology).unwrap()).unwrap();
    let out = Command::new(bin("pipeline")).arg("--topology").arg(&path).args(["apply"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("create    stream FACES_DETECT"));
}

#[tokio::test]
async fn database_password_never_appears_in_errors() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://facepipe:pg-s3cret-77@127.0.0.1:{closed}/facepipe");
    for args in [&["apply"][..], &["status", "b-1"], &["stats"]] {
        let out = pipeline_cli(dir.path(), &nats.url, "postgres://x@127.0.0.1:1/x", &[("PIPELINE_DATABASE_URL", &url)], args);
        assert!(!out.status.success(), "{args:?}");
        assert!(!text(&out).contains("pg-s3cret-77"), "{args:?}: {}", text(&out));
    }
}

/// A JWT signed by `signer` (an operator or account key), as `nsc` makes them.
fn jwt(signer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use data_encoding::BASE64URL_NOPAD;
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let mut claims = serde_json::json!({
        "iat": 1_700_000_000u64,
        "iss": signer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let digest = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(claims.to_string()));
    claims["jti"] = data_encoding::BASE32_NOPAD.encode(&digest).into();
    let payload = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signature = signer.sign(format!("{header}.{payload}").as_bytes()).unwrap();
    format!("{header}.{payload}.{}", BASE64URL_NOPAD.encode(&signature))
}

#[tokio::test]
async fn credentials_file_with_a_user_jwt_and_nkey() {
    // Operator mode: an operator signs an account (with JetStream), the account signs a user.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(&operator, &operator.public_key(), "op", serde_json::json!({"type": "operator", "version": 2}));
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1,
        "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(&operator, &account.public_key(), "facepipe", serde_json::json!({
        "limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2,
    }));
    // JetStream needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({"type": "account", "version": 2}));
    let user_jwt = jwt(&account, &user.public_key(), "stage", serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2,
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.conf");
    std::fs::write(
        &config,
        format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: {account_jwt}\n  {sys}: {system_jwt}\n}}\n",
            acc = account.public_key(),
            sys = system.public_key(),
        ),
    )
    .unwrap();
    let creds = dir.path().join("stage.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let nats = NatsServer::start_with_args(&["-c", config.to_str().unwrap()]);
    let db = TestDb::create().await;

    let refused = pipeline_cli(dir.path(), &nats.url, &db.url, &[], &["apply", "--dry-run"]);
    assert!(!refused.status.success(), "no credentials, no entry");
    assert!(text(&refused).contains("authorization violation"), "a clear reason: {}", text(&refused));
    let creds_env = [("PIPELINE_NATS_CREDS", creds.to_str().unwrap())];
    let out = pipeline_cli(dir.path(), &nats.url, &db.url, &creds_env, &["apply"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(&user.seed().unwrap()), "the seed is never printed");
}

/// `pipeline serve --listen 0.0.0.0:<port>` with `env`; the child and its port.
fn serve_everywhere(dir: &std::path::Path, nats_url: &str, db_url: &str, env: &[(&str, &str)]) -> (std::process::Child, u16) {
    let topology = test_topology(nats_url, db_url, &dir.join("objects"));
    let path = dir.join("topology.toml");
    std::fs::write(&path, toml::to_string(&topology).unwrap()).unwrap();
    let port = crate::support::free_port();
    let log = std::fs::File::create(dir.join(format!("serve-{port}.log"))).unwrap();
    let child = Command::new(bin("pipeline"))
        .arg("--topology")
        .arg(&path)
        .args(["serve", "--listen", &format!("0.0.0.0:{port}")])
        .env_remove("PIPELINE_API_TOKEN")
        .env_remove("PIPELINE_API_ALLOW_UNAUTHENTICATED")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, port)
}

#[tokio::test]
async fn serve_refuses_an_open_address_without_a_token_unless_told_to() {
    let nats = NatsServer::start();
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let log = |port: u16| std::fs::read_to_string(dir.path().join(format!("serve-{port}.log"))).unwrap();
    let stats = |port: u16, token: Option<&str>| {
        let mut request = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/api/batch/queue-stats"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };

    let applied = pipeline_cli(dir.path(), &nats.url, &db.url, &[], &["apply"]);
    assert!(applied.status.success(), "{}", text(&applied));

    // No token on 0.0.0.0: it says why and exits, serving nothing.
    let (mut child, port) = serve_everywhere(dir.path(), &nats.url, &db.url, &[]);
    let status = crate::support::wait_exit(&mut child, std::time::Duration::from_secs(30)).expect("serve exits");
    assert_ne!(status, Some(0), "{}", log(port));
    let said = log(port);
    assert!(said.contains("refusing to serve 0.0.0.0:") && said.contains("PIPELINE_API_TOKEN"), "{said}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing listens on {port}");

    // Told to: it serves anyone, and warns at start.
    let (mut child, port) = serve_everywhere(dir.path(), &nats.url, &db.url, &[("PIPELINE_API_ALLOW_UNAUTHENTICATED", "true")]);
    crate::support::wait_for_port(port, std::time::Duration::from_secs(30));
    assert_eq!(stats(port, None).await, 200);
    assert!(log(port).contains("warning: serving 0.0.0.0:"), "{}", log(port));
    child.kill().unwrap();
    child.wait().unwrap();

    // With a token: it serves, to those who carry it, without a warning.
    let (mut child, port) = serve_everywhere(dir.path(), &nats.url, &db.url, &[("PIPELINE_API_TOKEN", "s3cret-token")]);
    crate::support::wait_for_port(port, std::time::Duration::from_secs(30));
    assert_eq!(stats(port, None).await, 401);
    assert_eq!(stats(port, Some("s3cret-token")).await, 200);
    assert!(!log(port).contains("without a token"), "{}", log(port));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A login role of the test's own, with `CREATEDB`, so a password of the test's choosing
/// is the one PostgreSQL checks (where its authentication checks one); dropped on drop.
struct TestRole {
    name: String,
    database: String,
    admin: tokio_postgres::Client,
}

impl TestRole {
    async fn create() -> Self {
        let tag = format!("{}_{}", std::process::id(), rand::random::<u32>());
        let admin = crate::support::connect(&crate::support::admin_url()).await;
        let name = format!("fp_secret_{tag}");
        admin.batch_execute(&format!("CREATE ROLE {name} LOGIN CREATEDB")).await.unwrap();
        // So that the test's own role can drop what this role will own.
        admin.batch_execute(&format!("GRANT {name} TO CURRENT_USER")).await.unwrap();
        Self { name, database: format!("fp_secret_db_{tag}"), admin }
    }

    async fn set_password(&self, password: &str) {
        let quoted = password.replace('\'', "''");
        self.admin.batch_execute(&format!("ALTER ROLE {} PASSWORD '{quoted}'", self.name)).await.unwrap();
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE); DROP ROLE IF EXISTS {}", self.database, self.name);
        let url = crate::support::admin_url();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let client = crate::support::connect(&url).await;
                for statement in sql.split("; ") {
                    let _ = client.batch_execute(statement).await;
                }
            })
        })
        .join();
    }
}

/// Every form libpq takes a database password in (the URL's userinfo, its `?password=`,
/// the keyword form, quoted with spaces), each with a password of its own: applied
/// against a real nats-server, none reaches the key-value bucket, nor the output of
/// `validate`, `apply` (its plan shows the URL changing from form to form), `status`,
/// `results` or `stats`; and a full run (four stages, `submit --wait`, `serve`) logs none.
/// The NATS password and the API token, set in the file, are held to the same.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_of_any_form_reaches_the_bucket_the_output_or_the_logs() {
    let tag: u32 = rand::random();
    let nats_secret = format!("Nats-Pw-{tag}");
    let api_secret = format!("Api-Token-{tag}");
    let nats = NatsServer::start_with_args(&["--user", "facepipe", "--pass", &nats_secret]);
    let role = TestRole::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (r, db) = (&role.name, &role.database);
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    let pg_port = crate::support::connect_port();
    let forms: Vec<(&str, String, String)> = [
        ("userinfo", format!("Us3r:Inf0@Pw/{tag}")),
        ("query parameter", format!("Qu3ry&Pw={tag}")),
        ("keyword", format!("K3ywordPw{tag}")),
        ("keyword, quoted with spaces", format!("Sup3r Secret'Pw {tag}")),
    ]
    .into_iter()
    .map(|(form, pw)| {
        let url = match form {
            "userinfo" => format!("postgres://{r}:{}@127.0.0.1:{pg_port}/{db}", encode(&pw)),
            "query parameter" => format!("postgres://{r}@127.0.0.1:{pg_port}/{db}?password={}", encode(&pw)),
            "keyword" => format!("host=127.0.0.1 port={pg_port} user={r} password={pw} dbname={db}"),
            _ => format!("host=127.0.0.1 port={pg_port} user={r} password='{}' dbname={db}", pw.replace('\'', "\\'")),
        };
        (form, pw, url)
    })
    .collect();
    let mut secrets: Vec<String> = forms.iter().map(|(_, pw, _)| pw.clone()).collect();
    secrets.extend([nats_secret.clone(), api_secret.clone()]);
    let leaks = |what: &str, text: &str| {
        for secret in &secrets {
            // Also percent-encoded, as a URL would carry it.
            assert!(!text.contains(secret.as_str()) && !text.contains(&encode(secret)), "{what} shows a secret ({secret}):\n{text}");
        }
    };

    // The topology file as an operator writes it: the secrets in the file itself.
    let base = test_topology(&nats.url, "postgres://placeholder@127.0.0.1/placeholder", &dir.path().join("objects"));
    let write = |url: &str| {
        let mut text = base.to_toml();
        text = text.replace("url = \"postgres://placeholder@127.0.0.1:5432/placeholder\"", &format!("url = {}", toml::Value::from(url)));
        text = text.replacen("[nats.auth]\n", &format!("[nats.auth]\nuser = \"facepipe\"\npassword = \"{nats_secret}\"\n"), 1);
        text = text.replacen("[api]\n", &format!("[api]\ntoken = \"{api_secret}\"\n"), 1);
        assert!(text.contains(&nats_secret) && text.contains(&api_secret) && text.contains(db.as_str()), "the file holds every secret: {text}");
        let path = dir.path().join("topology.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let cli = |path: &std::path::Path, args: &[&str]| {
        let mut cmd = Command::new(bin("pipeline"));
        cmd.arg("--topology").arg(path).args(args).env("RUST_LOG", "debug");
        for (var, _) in std::env::vars() {
            if var.starts_with("PIPELINE_") && var != "PIPELINE_SHARED_DIR" {
                cmd.env_remove(var);
            }
        }
        let out = cmd.output().unwrap();
        (out.status.success(), text(&out))
    };
    let auth = async_nats::ConnectOptions::with_user_and_password("facepipe".into(), nats_secret.clone());
    let js = async_nats::jetstream::new(auth.connect(&nats.url).await.unwrap());

    let mut path = dir.path().join("topology.toml");
    for (form, password, url) in &forms {
        role.set_password(password).await;
        path = write(url);
        let (ok, out) = cli(&path, &["validate"]);
        assert!(ok, "{form}: {out}");
        leaks(&format!("validate ({form})"), &out);
        let (ok, out) = cli(&path, &["apply"]);
        assert!(ok, "{form}: {out}");
        leaks(&format!("apply ({form})"), &out);
        let stored = js.get_key_value("FACES_CONFIG").await.unwrap().get("topology").await.unwrap().expect("apply stores the topology");
        let stored = String::from_utf8(stored.to_vec()).unwrap();
        assert!(stored.contains(&format!("postgres://{r}@127.0.0.1:{pg_port}/{db}")), "{form}: the bucket holds the URL without its password: {stored}");
        leaks(&format!("the bucket after apply ({form})"), &stored);
    }

    // A full run with the last form (the issue's own: the keyword form, quoted).
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut stages = Vec::new();
    for stage in StageName::ALL {
        let log = std::fs::File::create(logs.join(format!("{stage}.log"))).unwrap();
        let mut cmd = Command::new(bin(stage.as_str()));
        cmd.arg("--topology").arg(&path).env("RUST_LOG", "debug");
        for (var, _) in std::env::vars() {
            if var.starts_with("PIPELINE_") && var != "PIPELINE_SHARED_DIR" {
                cmd.env_remove(var);
            }
        }
        stages.push(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap());
    }
    let zip = crate::support::photos_zip(dir.path(), "photos.zip", 3);
    let (ok, out) = cli(&path, &["submit", zip.to_str().unwrap(), "--batch-id", "secret-run", "--wait"]);
    assert!(ok, "{out}");
    leaks("submit --wait", &out);
    for args in [&["status", "secret-run"][..], &["results", "secret-run"], &["stats"], &["dead-letters", "list"]] {
        let (ok, out) = cli(&path, args);
        assert!(ok, "{args:?}: {out}");
        leaks(&format!("{args:?}"), &out);
    }
    let port = crate::support::free_port();
    let serve_log = logs.join("serve.log");
    let mut serve = Command::new(bin("pipeline"));
    serve.arg("--topology").arg(&path).args(["serve", "--listen", &format!("127.0.0.1:{port}")]).env("RUST_LOG", "debug");
    let mut serve = serve.stdout(Stdio::null()).stderr(std::fs::File::create(&serve_log).unwrap()).spawn().unwrap();
    crate::support::wait_for_port(port, std::time::Duration::from_secs(30));
    let http = reqwest::Client::new();
    let base_url = format!("http://127.0.0.1:{port}");
    let ok = http.get(format!("{base_url}/api/batch/status/secret-run")).bearer_auth(&api_secret).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    leaks("the status answer", &ok.text().await.unwrap());
    let refused = http.get(format!("{base_url}/api/batch/status/secret-run")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let _ = serve.kill();
    let _ = serve.wait();
    for mut child in stages {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = crate::support::wait_exit(&mut child, std::time::Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
    }
    for entry in std::fs::read_dir(&logs).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        assert!(text.contains("DEBUG") || text.contains("INFO"), "{} logged nothing: {text}", entry.path().display());
        leaks(&entry.path().display().to_string(), &text);
    }
}
