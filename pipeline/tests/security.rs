//! NATS authentication and TLS from topology and environment, against a real
//! nats-server that requires them; and no secret in any output.

mod support;

use std::process::{Command, Output};

use support::{bin, test_topology, NatsServer, TestDb};

/// Runs `pipeline <args>` with a topology for `nats_url` and extra environment.
fn pipeline_cli(dir: &std::path::Path, nats_url: &str, db_url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let topology = test_topology(nats_url, db_url, &dir.join("objects"));
    let path = dir.join("topology.toml");
    std::fs::write(&path, toml::to_string(&topology).unwrap()).unwrap();
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
