//! Start-up shared by every stage binary: arguments, logging, topology,
//! metrics, connections; then the runtime until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::health::Health;
use crate::error::StageError;
use crate::ctx::Ctx;
use crate::handler::Handler;
use crate::worker;
use crate::store::{Store, StoreError};
use facepipe_core::telemetry;
use facepipe_core::topology::{StageName, Topology, TopologyError, TOPOLOGY_ENV};

/// Command-line arguments every stage binary takes.
#[derive(Debug, clap::Parser)]
pub struct StageArgs {
    /// Topology file describing the deployment.
    #[arg(long, short, env = TOPOLOGY_ENV, default_value = "topology.toml")]
    pub topology: PathBuf,
    /// Prometheus listen address, overriding the stage's `metrics_addr` (use one port per process).
    #[arg(long, env = "PIPELINE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Log format: `human` or `json`.
    #[arg(long, env = "PIPELINE_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// Why a stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The topology is unreadable or invalid.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// NATS is unreachable.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The object store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metrics listener could not start.
    #[error("metrics listener on {addr}: {reason}")]
    Metrics {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The stage's own set-up failed.
    #[error("{0}")]
    Stage(String),
    /// The stage cannot serve as configured (a detector that does not load): the
    /// process stays up without pulling work, and `/readyz` says why, until stopped.
    #[error("refusing to serve: {0}")]
    Refused(String),
    /// The runtime failed.
    #[error(transparent)]
    Run(#[from] StageError),
    /// SIGINT/SIGTERM arrived while start-up was waiting for a service: exit quietly.
    #[error("stopped during start-up")]
    Stopped,
}

/// Installs the `tracing` subscriber (filter from `RUST_LOG`, else `default_filter`).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Tunes glibc's allocator for image work: one arena, so worker threads reuse each
/// other's freed buffers instead of each keeping its own resident (measured: detect's
/// peak RSS at 12 MP 155 -> 146 MiB with two workers, same throughput), and image-sized buffers kept
/// on the heap for reuse instead of being mapped, page-faulted, zeroed and
/// unmapped for every image (measured: 13% of detect's CPU time in the kernel).
pub fn tune_allocator() {
    // SAFETY: mallopt is thread-safe and only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` (`host:port`; port 0
/// disables them). Every metric of the process gets the label `stage`.
/// Returns whether metrics are recorded.
pub async fn init_endpoints(addr: &str, stage: StageName, health: Arc<Health>) -> Result<bool, StartError> {
    let err = |reason: String| StartError::Metrics { addr: addr.to_string(), reason };
    let socket: SocketAddr = addr.parse().map_err(|e: std::net::AddrParseError| err(e.to_string()))?;
    if socket.port() == 0 {
        return Ok(false);
    }
    let listener = tokio::net::TcpListener::bind(socket).await.map_err(|e| err(e.to_string()))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        // Process-wide, so the object store and vision code need not know their stage.
        .add_global_label("stage", stage.as_str())
        // Buckets make histograms (not summaries), which Prometheus can aggregate across replicas.
        .set_buckets(telemetry::SECONDS_BUCKETS)
        .map_err(|e| err(e.to_string()))?
        .install_recorder()
        .map_err(|e| err(e.to_string()))?;
    telemetry::describe();
    telemetry::register_zeros(stage);
    // Histogram samples are buffered until drained; without a scraper they would only grow.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(crate::health::serve(listener, handle, health));
    Ok(true)
}

/// The last resort of a graceful shutdown: once SIGINT/SIGTERM has arrived, the
/// process exits with status 1 if it has not stopped within the grace period
/// plus [`StopLimit::MARGIN`]. A stop that hangs (a service that never answers)
/// then shows as a failed stop in the log and the exit status, instead of a
/// process an orchestrator must kill; its un-acked messages are redelivered.
#[derive(Clone)]
struct StopLimit(Arc<AtomicU64>);

impl Default for StopLimit {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(Self::MARGIN.as_millis() as u64)))
    }
}

impl StopLimit {
    /// Time allowed beyond the grace period: draining the connection, closing up.
    const MARGIN: Duration = Duration::from_secs(20);

    fn follow_grace(&self, grace: Duration) {
        self.0.store((grace + Self::MARGIN).as_millis() as u64, Ordering::Relaxed);
    }

    /// Starts the watchdog on a thread of its own, so a wedged async runtime cannot hold it up.
    fn arm(self) {
        let since = std::time::Instant::now();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let limit = Duration::from_millis(self.0.load(Ordering::Relaxed));
            if since.elapsed() > limit {
                tracing::error!(?limit, "shutdown did not finish in time; exiting");
                std::process::exit(1);
            }
        });
    }
}

/// A started stage process, ready to run its handler.
pub struct Stage {
    /// Shared infrastructure for the handler.
    pub ctx: Arc<Ctx>,
    /// Cancelled by SIGINT/SIGTERM, from the first moment of start-up.
    shutdown: CancellationToken,
}

impl Stage {
    /// Parses arguments, sets up logging and metrics, loads the topology and connects.
    pub async fn start(stage: StageName) -> Result<Self, StartError> {
        use clap::Parser;
        let args = StageArgs::parse();
        // Listen for SIGTERM before anything slow, so a stop during start-up is graceful too.
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let stop_limit = StopLimit::default();
        let watchdog = stop_limit.clone();
        tokio::spawn(async move {
            worker::shutdown_signal().await;
            tracing::info!("shutdown requested");
            trigger.cancel();
            watchdog.arm();
        });
        tune_allocator();
        init_logging(args.log_format, "info");
        let topology = Topology::load(&args.topology)?;
        stop_limit.follow_grace(topology.stage(stage).shutdown_grace);
        let metrics_addr = args
            .metrics_addr
            .or_else(|| topology.stage(stage).metrics_addr.map(String::from));
        let health = Arc::new(Health::default());
        let mut metrics_on = false;
        if let Some(addr) = metrics_addr {
            // A second replica on the same host finds the port taken; it keeps working without them.
            match init_endpoints(&addr, stage, health.clone()).await {
                Ok(on) => metrics_on = on,
                Err(e) => tracing::warn!(error = %e, "metrics and health endpoints disabled"),
            }
        }
        let client_name = format!("facepipe-{stage}");
        let bus = tokio::select! {
            bus = Bus::connect(&topology.nats, &client_name, true) => bus?,
            _ = shutdown.cancelled() => return Err(StartError::Stopped),
        };
        let store = Store::open(&topology.object_store)?;
        if metrics_on {
            crate::lag::spawn_lag_poller(bus.clone(), topology.stream_name(stage), telemetry::LAG_INTERVAL, shutdown.clone());
        }
        let ctx = Arc::new(Ctx::new(stage, topology, bus, store, health));
        // The grace period can change live; the watchdog follows it.
        let mut changes = ctx.live.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let grace = changes.borrow_and_update().stage(stage).shutdown_grace;
                stop_limit.follow_grace(grace);
            }
        });
        Ok(Self { ctx, shutdown })
    }

    /// `connect` retried with capped backoff while it fails with an error `is_permanent`
    /// calls transient (a service still starting: PostgreSQL for extract and persist),
    /// each failure logged as `what` not ready; a permanent error stops the start-up,
    /// and so does SIGINT/SIGTERM ([`StartError::Stopped`]).
    pub async fn wait_for<T, E: std::fmt::Display>(
        &self,
        what: &str,
        mut connect: impl AsyncFnMut() -> Result<T, E>,
        is_permanent: impl Fn(&E) -> bool,
    ) -> Result<T, StartError> {
        let mut delay = Duration::from_millis(250);
        loop {
            match connect().await {
                Ok(connected) => return Ok(connected),
                Err(e) if is_permanent(&e) => return Err(StartError::Stage(format!("{what}: {e}"))),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "{what} not ready");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return Err(StartError::Stopped),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A token cancelled by SIGINT/SIGTERM, for a task of the stage's own to stop with it.
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs a stage binary's `main`: start-up, `build` the handler, run it until
    /// SIGINT/SIGTERM. A stop during start-up is a clean exit too.
    pub async fn main<H, F>(stage: StageName, build: F) -> Result<(), StartError>
    where
        H: Handler,
        F: AsyncFnOnce(&Stage) -> Result<H, StartError>,
    {
        let stage = match Stage::start(stage).await {
            Ok(stage) => stage,
            Err(StartError::Stopped) => return Ok(()),
            Err(e) => return Err(e),
        };
        match build(&stage).await {
            Ok(handler) => Ok(stage.run(handler).await?),
            Err(StartError::Stopped) => Ok(()),
            Err(StartError::Refused(reason)) => {
                stage.refuse(reason).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Stays up without pulling work, with `/readyz` answering why, until SIGINT or
    /// SIGTERM: an orchestrator then shows the reason instead of a restart loop.
    pub async fn refuse(self, reason: String) {
        tracing::error!(stage = %self.ctx.stage, %reason, "refusing to serve");
        self.ctx.health.refuse(reason);
        self.shutdown.cancelled().await;
    }

    /// Runs `handler` until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run<H: Handler>(self, handler: H) -> Result<(), StageError> {
        worker::run(self.ctx, Arc::new(handler), self.shutdown).await
    }
}
