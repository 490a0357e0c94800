//! An S3 server for the tests of `s3://` stores: `$S3S_FS_BIN`, else
//! `target/tools/s3s-fs/bin/s3s-fs`, which `scripts/setup --test` installs (crates.io's
//! `s3s-fs`). Each test starts its own on a free loopback port, with its objects in a
//! directory that outlives its restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use facepipe_core::topology::Topology;

use super::{free_port, repo_root, wait_for_port};

/// The access key of the tests' S3 servers: the one compose.yaml gives MinIO and the stages.
pub const S3_ACCESS_KEY: &str = "facepipe";

/// The secret key of the tests' S3 servers, as in compose.yaml.
pub const S3_SECRET_KEY: &str = "facepipe-secret";

/// The region requests are signed for, as in compose.yaml.
pub const S3_REGION: &str = "us-east-1";

fn s3_server_bin() -> PathBuf {
    let path = std::env::var_os("S3S_FS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools/s3s-fs/bin/s3s-fs"));
    assert!(path.is_file(), "{} missing: run `scripts/setup --test` (it installs crates.io's s3s-fs), or set S3S_FS_BIN", path.display());
    path
}

/// An S3 server (s3s-fs) on a free loopback port, requiring SigV4 with
/// [`S3_ACCESS_KEY`] and [`S3_SECRET_KEY`]. Its objects are files under a
/// directory of the test, so they survive [`S3Server::kill`] and
/// [`S3Server::start_again`] on the same port. Killed (by its PID) on drop.
pub struct S3Server {
    child: Option<Child>,
    /// Port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    root: tempfile::TempDir,
    logs: tempfile::TempDir,
    starts: usize,
}

impl S3Server {
    /// Starts a server with no bucket and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            root: tempfile::tempdir().unwrap(),
            logs: tempfile::tempdir().unwrap(),
            starts: 0,
        };
        server.start_again();
        server
    }

    /// Starts the server (again) on its port, over the same stored objects.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the S3 server is running");
        self.starts += 1;
        let log = std::fs::File::create(self.logs.path().join(format!("s3s-fs-{}.log", self.starts))).unwrap();
        let child = Command::new(s3_server_bin())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.root.path())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// Kills the server (SIGKILL, by its PID), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The running server's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Creates a bucket through the S3 API (CreateBucket, signed with SigV4 by curl).
    pub fn create_bucket(&self, bucket: &str) {
        // The SHA-256 of the empty body, which S3 servers want declared.
        const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let out = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "-X", "PUT"])
            .args(["-H", &format!("x-amz-content-sha256: {EMPTY_SHA256}")])
            .args(["--aws-sigv4", &format!("aws:amz:{S3_REGION}:s3")])
            .args(["--user", &format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}")])
            .arg(format!("{}/{bucket}", self.endpoint))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with("\n200"), "CreateBucket {bucket}: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(self.object_path(bucket, "").is_dir());
    }

    /// Where the server keeps `key` of `bucket` on disk (s3s-fs stores an object as a file).
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// Keys of the objects under `prefix` of `bucket`, read from the server's disk, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else {
                    out.push(path.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let base = self.object_path(bucket, "");
        let mut out = Vec::new();
        walk(&base.join(prefix), &base, &mut out);
        out.sort();
        out
    }

    /// The keys every process needs, as a deployment gives them: in the environment.
    pub fn key_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
        ]
    }

    /// Points `topology` at `s3://<bucket>/<prefix>` on this server, through the typed settings.
    pub fn configure(&self, topology: &mut Topology, bucket: &str, prefix: &str) {
        topology.object_store = facepipe_core::topology::ObjectStoreConfig {
            url: format!("s3://{bucket}/{prefix}"),
            endpoint: Some(self.endpoint.clone()),
            region: Some(S3_REGION.into()),
            allow_http: Some(true),
        };
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
