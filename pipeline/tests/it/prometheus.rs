//! A real Prometheus (Debian's `prometheus` package, `/usr/bin/prometheus` or
//! `$PROMETHEUS_BIN`) scrapes a real deployment with the project's scrape
//! configuration (`deploy/prometheus.yml`, its ports and interval replaced by
//! the test's), and its HTTP API reports a processed rate for every stage.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use facepipe_core::topology::{StageName, Topology};
use facepipe_core::domain::BatchStatus;
use crate::support::{free_port, labelled_photos, repo_root, Deployment, PhotoZip};

/// Photos in the test batch: enough for every stage to work for a few scrapes.
const PHOTOS: usize = 40;

fn prometheus_bin() -> PathBuf {
    let path: PathBuf = std::env::var_os("PROMETHEUS_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/prometheus".into());
    assert!(
        path.is_file(),
        "{} missing: this test needs a real Prometheus (`apt-get install prometheus`, or set PROMETHEUS_BIN)",
        path.display()
    );
    path
}

/// A Prometheus server on a free port with its own storage; killed (by its PID) on drop.
struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML text) and waits until it is ready.
    async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("prometheus.log");
        let port = free_port();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus");
        let server = Self { child, port, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("http://127.0.0.1:{port}/-/ready")).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return server;
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 60 s:\n{}", server.log_text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query; the value of each result by its `stage` label (or its whole label set).
    async fn query(&self, query: &str) -> BTreeMap<String, f64> {
        let response: serde_json::Value = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&[("query", query)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(response["status"], "success", "{query}: {response}");
        response["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"].as_object().unwrap();
                let key = match labels.get("stage") {
                    Some(stage) if labels.len() == 1 => stage.as_str().unwrap().to_string(),
                    _ => labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap())).collect::<Vec<_>>().join(","),
                };
                (key, r["value"][1].as_str().unwrap().parse::<f64>().unwrap())
            })
            .collect()
    }

    /// Repeats `query` until `done` holds for its results; panics after `timeout`.
    async fn query_until(
        &self,
        query: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> BTreeMap<String, f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(query).await;
            if done(&result) {
                return result;
            }
            assert!(Instant::now() < deadline, "{query} still {result:?} after {timeout:?}:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Child::kill is kill(2) on this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `deploy/prometheus.yml` pointed at this test's ports, scraping every second.
fn scrape_config(ports: &[(StageName, u16)]) -> String {
    let repo = repo_root();
    let mut config = std::fs::read_to_string(repo.join("deploy/prometheus.yml")).unwrap();
    let defaults = Topology::parse(&std::fs::read_to_string(repo.join("topology.toml")).unwrap()).unwrap();
    assert!(config.contains("scrape_interval: 15s"), "deploy/prometheus.yml sets a global scrape_interval");
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s");
    for (stage, port) in ports {
        let default = defaults.stage(*stage).metrics_addr.expect("topology.toml gives every stage a metrics_addr");
        let target = format!("- {default}\n");
        assert!(config.contains(&target), "deploy/prometheus.yml scrapes {stage} on {default}");
        config = config.replace(&target, &format!("- 127.0.0.1:{port}\n"));
    }
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_all_four_stages_and_sees_each_process_a_batch() {
    prometheus_bin();
    let ports: Vec<(StageName, u16)> = StageName::ALL.into_iter().map(|s| (s, free_port())).collect();
    let addrs = ports.clone();
    let d = Deployment::start(move |t| {
        for (stage, port) in addrs {
            let addr = Some(format!("127.0.0.1:{port}"));
            match stage {
                StageName::Extract => t.stages.extract.metrics_addr = addr,
                StageName::Detect => t.stages.detect.metrics_addr = addr,
                StageName::Crop => t.stages.crop.metrics_addr = addr,
                StageName::Persist => t.stages.persist.metrics_addr = addr,
            }
        }
    })
    .await;
    let prometheus = Prometheus::start(&scrape_config(&ports)).await;

    // Every stage's counters exist (at zero) and were scraped before any work arrives,
    // so increase() sees the whole of it, even extract's single job.
    let scraped = prometheus
        .query_until(r#"count by (stage) (facepipe_messages_total{outcome="ok"})"#, Duration::from_secs(60), |r| r.len() == 4)
        .await;
    println!("stages scraped before the batch: {scraped:?}");

    let (zip, _) = PhotoZip::of(labelled_photos().iter().take(PHOTOS)).write(&d.dir.path().join("faces.zip"));
    d.cli_ok(&["submit", zip.to_str().unwrap(), "--batch-id", "scraped"]);
    let status = d.wait_for_batch("scraped", Duration::from_secs(300)).await;
    assert_eq!((status.status, status.processed), (BatchStatus::Completed, PHOTOS as i32));

    // Wait for the last scrapes: one extract job, and every photo through the other three.
    let expected: BTreeMap<String, f64> =
        StageName::ALL.iter().map(|s| (s.to_string(), if *s == StageName::Extract { 1.0 } else { PHOTOS as f64 })).collect();
    let totals = prometheus
        .query_until(r#"sum by (stage) (facepipe_messages_total{outcome="ok"})"#, Duration::from_secs(90), |r| *r == expected)
        .await;
    let increase = prometheus.query(r#"sum by (stage) (increase(facepipe_messages_total{outcome="ok"}[5m]))"#).await;
    let rates = prometheus.query(r#"sum by (stage) (rate(facepipe_messages_total{outcome="ok"}[1m]))"#).await;
    println!("stage     total  increase[5m]  rate[1m]/s");
    for stage in StageName::ALL.map(|s| s.to_string()) {
        println!("{stage:<8} {:>6} {:>13.1} {:>11.3}", totals[&stage], increase.get(&stage).unwrap_or(&0.0), rates.get(&stage).unwrap_or(&0.0));
    }
    for stage in StageName::ALL {
        assert!(increase.get(stage.as_str()).is_some_and(|v| *v > 0.0), "{stage} increase: {increase:?}");
        assert!(rates.get(stage.as_str()).is_some_and(|v| *v > 0.0), "{stage} rate: {rates:?}");
    }

    // The other metrics arrive too: step latencies, object bytes, consumer lag.
    let steps = prometheus
        .query(r#"histogram_quantile(0.99, sum by (stage, step, le) (rate(facepipe_step_seconds_bucket[5m])))"#)
        .await;
    println!("p99 step seconds: {steps:#?}");
    for want in ["stage=extract,step=store", "stage=detect,step=fetch", "stage=detect,step=decode", "stage=detect,step=detect", "stage=crop,step=encode", "stage=crop,step=store"] {
        assert!(steps.contains_key(want), "no {want} step latency: {steps:?}");
    }
    let read = prometheus.query("sum by (stage) (facepipe_object_read_bytes_total)").await;
    let written = prometheus.query("sum by (stage) (facepipe_object_written_bytes_total)").await;
    println!("object bytes read: {read:?}\nobject bytes written: {written:?}");
    assert!(read.get("detect").is_some_and(|v| *v > 0.0) && read.get("crop").is_some_and(|v| *v > 0.0), "{read:?}");
    assert!(written.get("extract").is_some_and(|v| *v > 0.0) && written.get("crop").is_some_and(|v| *v > 0.0), "{written:?}");
    // The gauges trail the queues by a poll (5 s) and a scrape: wait for them to drain.
    let lag = prometheus
        .query_until("sum by (stage) (max by (stage, consumer) (facepipe_consumer_pending_messages))", Duration::from_secs(30), |r| {
            r.len() == 4 && r.values().all(|v| *v == 0.0)
        })
        .await;
    println!("consumer pending after the batch: {lag:?}");
    let consumers = prometheus.query("count by (stage) (facepipe_consumer_ack_pending_messages)").await;
    println!("consumers per stage (one per priority band): {consumers:?}");

    // One process never exposes the same series twice (the global stage label
    // must merge with an explicit one), which Prometheus would reject.
    for (stage, port) in &ports {
        let (status, body) = crate::support::http_get(*port, "/metrics");
        assert_eq!(status, 200);
        let mut seen = std::collections::HashSet::new();
        for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let series = line.rsplit_once(' ').unwrap().0;
            assert!(seen.insert(series.to_string()), "{stage} exposes {series} twice");
        }
    }
    let up = prometheus.query("up").await;
    assert!(up.values().all(|v| *v == 1.0) && up.len() == 4, "{up:?}");

    // Every query of the Grafana dashboard is valid PromQL over these metrics and finds data.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("deploy/grafana/dashboards/facepipe.json")).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "5m");
            let result = prometheus.query(&expr).await;
            println!("dashboard {:?}: {} series", panel["title"].as_str().unwrap(), result.len());
            if !expr.contains(r#"outcome!="ok""#) {
                assert!(!result.is_empty(), "dashboard query finds nothing: {expr}");
            }
        }
    }
}

/// The deployment files parse: both scrape configurations (promtool), the
/// Kubernetes ConfigMap's topology, the Grafana dashboard.
#[test]
fn deployment_files_are_valid() {
    let repo = repo_root();
    let promtool = prometheus_bin().with_file_name("promtool");
    for config in ["deploy/prometheus.yml", "deploy/prometheus-compose.yml"] {
        let out = Command::new(&promtool).args(["check", "config"]).arg(repo.join(config)).output().expect("run promtool");
        assert!(out.status.success(), "{config}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    // The ConfigMap's block scalar, indented by four spaces under `topology.toml: |`.
    let manifest = std::fs::read_to_string(repo.join("deploy/kubernetes/topology.yaml")).unwrap();
    let block = manifest.split_once("topology.toml: |\n").expect("the ConfigMap holds topology.toml").1;
    let toml: String = block.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect();
    let topology = Topology::parse(&toml).unwrap_or_else(|e| panic!("deploy/kubernetes/topology.yaml: {e}"));
    topology.validate().unwrap();
    assert_eq!((topology.nats.servers().len(), topology.nats.replicas), (3, 3), "a 3-node JetStream cluster, streams replicated 3x");
    for stage in StageName::ALL {
        assert_eq!(topology.stage(stage).metrics_addr, Some("0.0.0.0:9100"), "{stage} listens where the probes look");
    }
    let dashboard = std::fs::read_to_string(repo.join("deploy/grafana/dashboards/facepipe.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).unwrap();
}
