//! A whole deployment on this machine: a nats-server, a fresh database, a topology
//! pointing at both with a private object store, `pipeline apply`, and the real stage
//! binaries (built by [`bin`] when a test first needs one, so a test never runs a stale
//! binary); `pipeline serve` beside it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use facepipe_core::topology::{StageName, Topology};
use facepipe_ledger::{BatchSummary, Db};

use super::{
    free_port, prometheus_counter, repo_root, start_cluster_on, use_shared_models, wait_exit, wait_for_jetstream, wait_for_port, Host, NatsServer,
    TestDb,
};

/// Directory of the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Path of a workspace binary. The first call builds the workspace as `scripts/test`
/// does (`cargo build --workspace --all-targets`: with the integration tests in the
/// build, the stages get the `fault-injection` feature the tests use), so `cargo test
/// --test it` after an edit never runs a stale stage binary; when nothing changed, the
/// build only checks that and takes a second or two.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Err(why) = BUILT.get_or_init(build_workspace) {
        panic!("{why}");
    }
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} missing after the build", path.display());
    path
}

/// `cargo build --workspace --all-targets`, in this test binary's profile.
fn build_workspace() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--workspace", "--all-targets"]).current_dir(repo_root());
    if bin_dir().ends_with("release") {
        build.arg("--release");
    }
    let out = build.output().map_err(|e| format!("cannot run cargo to build the binaries the tests run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("building the binaries the tests run failed:\n{}", String::from_utf8_lossy(&out.stderr)))
    }
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
        t.stages.set_metrics_addr(stage, None);
    }
    t.validate().unwrap();
    t
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
        Self::start_clustered_on(&[None, None, None], edit, &StageName::ALL).await
    }

    /// Like [`Deployment::start_clustered`], with one node per entry of `hosts` (on that
    /// test host, or on loopback), starting only the processes of `stages`.
    pub async fn start_clustered_on(hosts: &[Option<&Host>], edit: impl FnOnce(&mut Topology), stages: &[StageName]) -> Self {
        let mut nodes = start_cluster_on(hosts);
        let replicas = nodes.len();
        let first = nodes.remove(0);
        if !wait_for_jetstream(&first.url, Duration::from_secs(30)).await {
            let logs: Vec<String> = std::iter::once(&first).chain(&nodes).map(|n| n.log_text()).collect();
            panic!("the cluster's JetStream is not ready after 30 s:\n{}", logs.join("\n----\n"));
        }
        let edit = |t: &mut Topology| {
            t.nats.replicas = replicas;
            edit(t)
        };
        Self::start_on(first, nodes, edit, Vec::new(), Vec::new(), false, stages).await
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

    /// Starts one more process of `stage` on test host `host` (see [`facepipe_testkit::Network`]), serving its
    /// metrics and health endpoints there on a free port; returns the port.
    pub fn start_stage_on(&mut self, stage: StageName, host: &Host) -> u16 {
        let port = free_port();
        let child = self.spawn_stage_on(stage, &[("PIPELINE_METRICS_ADDR".into(), format!("{}:{port}", host.ip))], Some(host));
        self.stages.push((stage, child));
        port
    }

    fn spawn_stage(&mut self, stage: StageName, extra_env: &[(String, String)]) -> Child {
        self.spawn_stage_on(stage, extra_env, None)
    }

    fn spawn_stage_on(&mut self, stage: StageName, extra_env: &[(String, String)], host: Option<&Host>) -> Child {
        self.spawned += 1;
        let log_path = self.dir.path().join(format!("{stage}-{}.log", self.spawned));
        let log = std::fs::File::create(log_path).unwrap();
        let mut cmd = self.command(stage.as_str());
        cmd.envs(self.stage_env.iter().chain(extra_env).map(|(k, v)| (k, v)));
        if let Some(host) = host {
            cmd = on_host(cmd, host);
        }
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

    /// Asserts what every fault test asserts of a finished batch, and returns its results:
    /// completed with `entries` images, `failed` of them failed; every entry has exactly
    /// one final outcome; the crops in the object store are exactly the recorded ones.
    pub async fn check_every_entry_once(&self, batch_id: &str, entries: usize, failed: usize) -> Vec<facepipe_ledger::ImageResult> {
        use facepipe_core::domain::{BatchStatus, ImageStatus};
        let db = self.db().await;
        let status = db.batch_status(batch_id).await.unwrap().unwrap();
        assert_eq!(status.status, BatchStatus::Completed, "{status:?}\n{}", self.logs());
        let results = db.results(batch_id).await.unwrap();
        let errors: Vec<(&str, Option<&str>)> = results.iter().filter(|r| r.status == ImageStatus::Failed).map(|r| (r.entry.as_str(), r.error.as_deref())).collect();
        assert_eq!((status.image_count, status.processed, status.failed), (Some(entries as i32), entries as i32, failed as i32), "{status:?}: {errors:?}");
        assert_eq!(results.len(), entries, "one row per entry");
        let names: std::collections::BTreeSet<&str> = results.iter().map(|r| r.entry.as_str()).collect();
        assert_eq!(names.len(), entries, "no entry twice");
        assert!(results.iter().all(|r| r.status != ImageStatus::Pending), "every entry has its outcome");
        let store = facepipe_runtime::store::Store::open(&self.topology.object_store).unwrap();
        let stored: std::collections::BTreeSet<String> = store.list(&format!("batches/{batch_id}/crops")).await.unwrap().into_iter().collect();
        let recorded: std::collections::BTreeSet<String> = results.iter().flat_map(|r| r.crop_keys.iter().cloned()).collect();
        assert_eq!(stored, recorded, "the crops stored are exactly the recorded ones");
        results
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

/// `command`, run on test host `host` (`ip netns exec`, which execs it: the PID is the program's).
fn on_host(command: Command, host: &Host) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped.args(host.exec_prefix()).arg(command.get_program()).args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, child) in &mut self.stages {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `pipeline serve` process on a free loopback port, stopped (by its PID) on drop.
pub struct ApiServer {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Its port.
    pub port: u16,
    /// A client for it.
    pub client: reqwest::Client,
    /// Where its log goes.
    pub log: PathBuf,
}

impl ApiServer {
    /// `pipeline serve` for `d`, with `PIPELINE_API_TOKEN` set to `token` (or unset).
    pub fn start_with_token(d: &Deployment, token: Option<&str>) -> Self {
        let port = free_port();
        let log_path = d.dir.path().join(format!("api-{port}.log.txt"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = d.command("pipeline");
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).env_remove("PIPELINE_API_TOKEN");
        if let Some(token) = token {
            command.env("PIPELINE_API_TOKEN", token);
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        wait_for_port(port, Duration::from_secs(30));
        Self { child, base: format!("http://127.0.0.1:{port}"), port, client: reqwest::Client::new(), log: log_path }
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
