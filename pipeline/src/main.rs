//! `pipeline`: the operator CLI of the face-crop pipeline.
//!
//! `apply` sets up streams, consumers and the database; `submit` starts a
//! batch; `status` and `results` read PostgreSQL; `dead-letters` lists and
//! replays failures; `sweep` applies the retention policy; `up` runs every
//! stage on this machine as child processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use facepipe_runtime::bus::{self, Bus};
use facepipe_ledger::{self as db, Db};
use facepipe_control::deadletters;
use facepipe_runtime::live;
use facepipe_control::batches::{Batches, Started, ZipUpload};
use facepipe_core::domain::{BatchStatus, Priority};
use facepipe_runtime::store::Store;
use facepipe_core::topology::{StageName, Topology, TOPOLOGY_ENV};

use pipeline::processes;

use processes::StageGroup;

#[derive(Parser)]
#[command(name = "pipeline", version, about = "Operate the face-crop pipeline")]
struct Cli {
    /// Topology file describing the deployment.
    #[arg(long, short, global = true, env = TOPOLOGY_ENV, default_value = "topology.toml")]
    topology: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// Every command: the operator's, and the lab's, which run `pipeline-lab`.
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Operate(Operation),
    #[command(flatten)]
    Lab(LabCommand),
}

/// What an operator does to a deployment.
#[derive(Subcommand)]
enum Operation {
    /// Check the topology file without touching any server (`validate FILE` or `-t FILE`).
    Validate {
        /// The topology file, instead of `-t`.
        file: Option<PathBuf>,
    },
    /// Create or update the streams, consumers and database schema the topology describes.
    Apply {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Upload a ZIP and start a batch; prints the batch id.
    Submit {
        /// The ZIP archive of photos.
        zip: PathBuf,
        /// Project the batch belongs to.
        #[arg(long, default_value = "default")]
        project: String,
        /// Priority 1 (lowest) to 10 (highest).
        #[arg(long, default_value_t = Priority::DEFAULT)]
        priority: Priority,
        /// Batch id to use instead of a generated one.
        #[arg(long)]
        batch_id: Option<String>,
        /// Wait until the batch completes and print its status.
        #[arg(long)]
        wait: bool,
        /// Wait with a progress bar (rate and ETA) until the batch completes.
        #[arg(long, conflicts_with = "wait")]
        watch: bool,
    },
    /// Follow a batch with a progress bar (rate and ETA) until it completes.
    Watch {
        /// Batch id.
        batch: String,
    },
    /// Show a batch's progress.
    Status {
        /// Batch id.
        batch: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Queue statistics per stage: waiting, active, retrying, completed, failed, idle pullers.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one JSON line per image of a batch.
    Results {
        /// Batch id.
        batch: String,
    },
    /// Delete what `[retention]` says has expired (uploads, originals, crops of
    /// completed batches; staging files of interrupted writes), once.
    Sweep {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Find images whose messages the broker lost (pending, nothing of their batch in
    /// any stream) and publish their jobs again; every `reconcile.every` until Ctrl-C,
    /// as persist does, unless `--once`.
    Reconcile {
        /// Look once, and exit.
        #[arg(long)]
        once: bool,
        /// Say what would be marked stalled and re-driven; change nothing (implies --once).
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List or replay messages that failed for good.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Run every stage on this machine as child processes until Ctrl-C.
    Up {
        /// Processes per stage, e.g. `--replicas detect=2` (default: each stage's `replicas` in the topology).
        #[arg(long, value_parser = processes::parse_replicas)]
        replicas: Vec<(StageName, usize)>,
    },
    /// Serve the HTTP API (the old design's endpoints) until Ctrl-C or SIGTERM.
    Serve {
        /// Listen address, overriding `api.listen`.
        #[arg(long)]
        listen: Option<String>,
    },
}

/// The measuring tools, in `pipeline-lab` (which links OpenCV and ONNX Runtime, as
/// this CLI does not). Their arguments go to it unread.
#[derive(Subcommand)]
enum LabCommand {
    /// Score the detect stage's settings on labelled photos (runs `pipeline-lab eval`; see its `--help`).
    #[command(disable_help_flag = true)]
    Eval {
        /// Arguments of `pipeline-lab eval`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Measure end-to-end throughput against the in-process floor (runs `pipeline-lab bench`; see its `--help`).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments of `pipeline-lab bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

impl LabCommand {
    /// Replaces this process with `pipeline-lab <command> <args>`, found beside this
    /// binary (as `git foo` runs `git-foo`); returns only the reason it could not.
    fn exec(self, topology: &Path) -> anyhow::Error {
        use std::os::unix::process::CommandExt;
        let (name, args) = match self {
            LabCommand::Eval { args } => ("eval", args),
            LabCommand::Bench { args } => ("bench", args),
        };
        let lab = match processes::binary_dir() {
            Ok(dir) => dir.join("pipeline-lab"),
            Err(e) => return e,
        };
        // The topology through the environment, so a `-t` among the arguments still wins.
        let error = std::process::Command::new(&lab).arg(name).args(args).env(TOPOLOGY_ENV, topology).exec();
        anyhow::anyhow!("cannot run {}: {error} (it is built with the workspace: cargo build --release)", lab.display())
    }
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Show dead letters, oldest first (read a page at a time, however many there are).
    List {
        /// Only those of this batch.
        #[arg(long)]
        batch: Option<String>,
        /// Start after this id (the last id of a previous listing).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Show at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on their subjects (reopening the failures they recorded).
    Replay {
        /// Every dead letter of this batch.
        #[arg(long, conflicts_with_all = ["id", "all"])]
        batch: Option<String>,
        /// These dead letters (ids from `list`).
        #[arg(long, num_args = 1..)]
        id: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    let command = match cli.command {
        Command::Operate(operation) => operation,
        Command::Lab(lab) => return Err(lab.exec(&cli.topology)),
    };
    // `pipeline validate topology.toml`, as `vector validate` and `promtool check config` take it.
    if let Operation::Validate { file: Some(file) } = &command {
        cli.topology = file.clone();
    }
    // A server logs its requests; the one-shot commands only what goes wrong.
    let default_filter = if matches!(command, Operation::Serve { .. }) { "info" } else { "warn" };
    facepipe_runtime::app::init_logging(facepipe_runtime::app::LogFormat::Human, default_filter);
    let topology = Topology::load(&cli.topology)?;
    match command {
        Operation::Validate { .. } => {
            println!("{}: valid", cli.topology.display());
            Ok(())
        }
        Operation::Apply { dry_run } => apply(&topology, dry_run).await,
        Operation::Submit { zip, project, priority, batch_id, wait, watch } => {
            let batch = submit(&topology, &zip, project, priority, batch_id, wait).await?;
            if watch {
                watch_batch(&topology, &batch).await?;
            }
            Ok(())
        }
        Operation::Watch { batch } => watch_batch(&topology, &batch).await,
        Operation::Status { batch, json } => status(&topology, &batch, json).await,
        Operation::Stats { json } => stats(&topology, json).await,
        Operation::Results { batch } => results(&topology, &batch).await,
        Operation::DeadLetters { command } => dead_letters(&topology, command).await,
        Operation::Reconcile { once, dry_run, json } => reconcile(&topology, once || dry_run, dry_run, json).await,
        Operation::Sweep { json } => sweep(&topology, json).await,
        Operation::Up { replicas } => up(&cli.topology, &topology, replicas.into_iter().collect()).await,
        Operation::Serve { listen } => serve(topology, listen).await,
    }
}

async fn serve(topology: Topology, listen: Option<String>) -> anyhow::Result<()> {
    let addr = listen.unwrap_or_else(|| topology.api.listen.clone());
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("listening on {addr}"))?;
    // Checked before anything else, on the bound address: a host name is judged by what it resolved to.
    let local = listener.local_addr()?;
    if facepipe_api::guard::exposure(local, &topology.api)? == facepipe_api::guard::Exposure::OpenByChoice {
        tracing::warn!(%local, "serving without a token on a non-loopback address (api.allow_unauthenticated): anyone who can reach it can upload and replay");
        eprintln!("warning: serving {local} without a token (api.allow_unauthenticated): anyone who can reach it can upload and replay");
    }
    // Uploads a crashed server was spooling.
    facepipe_runtime::scratch::sweep(&topology.api.upload_dir.clone().unwrap_or_else(std::env::temp_dir));
    let bus = Bus::connect(&topology.nats, "facepipe-api", true).await?;
    let store = Store::open(&topology.object_store)?;
    let db = database(&topology)?;
    db.ping().await.context("PostgreSQL")?;
    eprintln!("serving the HTTP API on http://{local} (OpenAPI document at /openapi.json)");
    if topology.retention.is_set() {
        tokio::spawn(sweep_every(db.clone(), store.clone(), topology.clone()));
    }
    let state = std::sync::Arc::new(facepipe_api::ApiState::new(topology, bus, store, db));
    facepipe_api::serve(listener, state, facepipe_runtime::worker::shutdown_signal()).await?;
    Ok(())
}

/// `pipeline serve`'s sweeper: one sweep every `retention.sweep_every`, for as long as it serves.
async fn sweep_every(db: Db, store: Store, topology: Topology) {
    let mut every = tokio::time::interval(topology.retention.sweep_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match facepipe_control::retention::sweep(&db, &store, &topology).await {
            Ok(r) if r.ran => tracing::info!(uploads = r.uploads, originals = r.originals, crops = r.crops, staging_files = r.staging_files, "retention sweep done"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %facepipe_runtime::error::chain(&e), "retention sweep failed; trying again at the next one"),
        }
    }
}

async fn sweep(topology: &Topology, json: bool) -> anyhow::Result<()> {
    if !topology.retention.is_set() {
        eprintln!("no retention period is set in [retention]: only staging files can expire");
    }
    let report = facepipe_control::retention::sweep(&database(topology)?, &Store::open(&topology.object_store)?, topology).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if !report.ran {
        println!("another sweeper is running; nothing done");
    } else {
        println!(
            "deleted {} upload(s), {} original(s), {} crop(s), {} staging file(s)",
            report.uploads, report.originals, report.crops, report.staging_files
        );
    }
    Ok(())
}

fn database(topology: &Topology) -> anyhow::Result<Db> {
    Ok(Db::connect(&topology.postgres.url, topology.postgres.pool_size)?)
}

async fn apply(topology: &Topology, dry_run: bool) -> anyhow::Result<()> {
    let bus = Bus::connect(&topology.nats, "facepipe-cli", false).await?;
    let plan = bus::plan(&bus, topology).await?;
    println!("JetStream at {}:", topology.nats.url);
    for item in &plan {
        println!("  {item}");
    }
    match live::stored(&bus, topology).await.unwrap_or_else(|e| {
        println!("Running stages: the stored topology cannot be read ({e}); it will be replaced");
        None
    }) {
        None => println!("Running stages: the topology is stored for them to watch (first apply)"),
        Some(stored) => {
            let changes = live::changes(&stored, topology);
            if changes.is_empty() {
                println!("Running stages: no setting changes");
            } else {
                println!("Running stages:");
            }
            for change in &changes.live {
                println!("  ~ live      {change} (running stages apply it from their next message)");
            }
            for change in &changes.restart {
                println!("  ! restart   {change} (restart the stages to apply it)");
            }
        }
    }
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    bus::apply(&bus, topology, &plan).await?;
    if db::ensure_database(&topology.postgres.url).await? {
        println!("PostgreSQL: created the database");
    }
    let applied = database(topology)?.migrate().await?;
    println!("PostgreSQL: {} migration(s) applied", applied.len());
    let revision = live::publish(&bus, topology).await?;
    println!("topology stored for running stages (revision {revision})");
    println!("applied");
    Ok(())
}

async fn submit(
    topology: &Topology,
    zip: &Path,
    project_id: String,
    priority: Priority,
    batch_id: Option<String>,
    wait: bool,
) -> anyhow::Result<String> {
    if !zip.is_file() {
        bail!("{} is not a file", zip.display());
    }
    let source = zip.display().to_string();
    let batch_id = Batches::batch_id(batch_id, &project_id, &source)?;
    let bus = Bus::connect(&topology.nats, "facepipe-cli", false).await?;
    let service = Batches::new(topology.clone(), bus, database(topology)?, Store::open(&topology.object_store)?);
    let Started { batch_id, bytes } = service.submit_zip(batch_id, project_id, priority, ZipUpload::File(zip), &source).await?;
    eprintln!("submitted {} ({bytes} bytes) as batch {batch_id}", zip.display());
    println!("{batch_id}");
    if wait {
        let db = database(topology)?;
        let started = Instant::now();
        let last = wait_for_batch(&db, &batch_id).await?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "batch {batch_id} {}: {} images ({} failed, {} faces) in {secs:.1}s = {:.1} images/s",
            last.status,
            last.processed,
            last.failed,
            last.faces,
            last.processed as f64 / secs.max(1e-9)
        );
    }
    Ok(batch_id)
}

/// Draws a progress bar from the batch's row until it completes or fails.
async fn watch_batch(topology: &Topology, batch_id: &str) -> anyhow::Result<()> {
    let db = database(topology)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:>12} [{bar:40}] {pos}/{len} images  {per_sec}  ETA {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let followed = facepipe_control::batches::follow(&db, batch_id, Duration::from_millis(250), None, |s| {
        if let Some(n) = s.image_count {
            bar.set_length(n as u64);
        }
        bar.set_position(s.processed as u64);
        bar.set_message(if s.failed > 0 { format!("{} ({} failed)", s.status, s.failed) } else { s.status.to_string() });
    })
    .await;
    let last = match followed {
        Ok(last) => last,
        Err(e) => {
            bar.abandon();
            return Err(e.into());
        }
    };
    bar.finish();
    println!(
        "batch {} {}: {}/{} images, {} failed, {} faces",
        last.batch_id,
        last.status,
        last.processed,
        last.image_count.unwrap_or(0),
        last.failed,
        last.faces
    );
    if last.status == BatchStatus::Failed {
        bail!("batch failed: {}", last.error.unwrap_or_default());
    }
    Ok(())
}

/// Follows a batch until it completes or fails, printing each change of its progress to stderr.
async fn wait_for_batch(db: &Db, batch_id: &str) -> anyhow::Result<db::BatchSummary> {
    let mut shown = String::new();
    Ok(facepipe_control::batches::follow(db, batch_id, Duration::from_millis(250), None, |s| {
        let count = s.image_count.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
        let line = format!("{}: {}/{count} processed, {} failed", s.status, s.processed, s.failed);
        if line != shown {
            eprintln!("  {line}");
            shown = line;
        }
    })
    .await?)
}

async fn status(topology: &Topology, batch_id: &str, json: bool) -> anyhow::Result<()> {
    let Some(s) = database(topology)?.batch_status(batch_id).await? else {
        bail!("no batch `{batch_id}`");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("batch        {}", s.batch_id);
        println!("project      {}", s.project_id);
        println!("status       {}", s.status);
        println!(
            "image_count  {}",
            s.image_count.map(|n| n.to_string()).unwrap_or_else(|| "(still reading the archive)".into())
        );
        println!("processed    {} ({:.1}%)", s.processed, s.progress_percent);
        println!("failed       {}", s.failed);
        println!("faces        {}", s.faces);
        println!("skipped      {} non-image entries", s.skipped);
        if let Some(since) = s.stalled_since {
            println!(
                "stalled      since {} (images pending, nothing of the batch in any stream): re-driven once unchanged for {:?}",
                since.format("%Y-%m-%d %H:%M:%S"),
                topology.stalled_after()
            );
        }
        if s.redriven > 0 {
            println!("re-driven    {} image(s), the broker having lost their messages", s.redriven);
        }
        if let Some(e) = &s.error {
            println!("error        {e}");
        }
    }
    Ok(())
}

async fn stats(topology: &Topology, json: bool) -> anyhow::Result<()> {
    let bus = Bus::connect(&topology.nats, "facepipe-cli", false).await?;
    let queues = facepipe_control::stats::stage_stats(&bus, &database(topology)?, topology).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&queues)?);
    } else {
        println!(
            "{:<8} {:>9} {:>7} {:>9} {:>10} {:>7} {:>9} {:>13}",
            "stage", "waiting", "active", "retrying", "completed", "failed", "replicas", "idle pullers"
        );
        for q in &queues {
            println!(
                "{:<8} {:>9} {:>7} {:>9} {:>10} {:>7} {:>9} {:>13}",
                q.stage.as_str(), q.waiting, q.active, q.retrying, q.completed, q.failed, q.replicas, q.idle_pullers
            );
        }
    }
    Ok(())
}

async fn results(topology: &Topology, batch_id: &str) -> anyhow::Result<()> {
    let db = database(topology)?;
    if db.batch_status(batch_id).await?.is_none() {
        bail!("no batch `{batch_id}`");
    }
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // Streamed from a server-side cursor: a million rows take no more memory than a thousand.
    db.for_each_result(batch_id, |row| -> anyhow::Result<()> {
        serde_json::to_writer(&mut out, &row)?;
        writeln!(out)?;
        Ok(())
    })
    .await?;
    out.flush()?;
    Ok(())
}

async fn reconcile(topology: &Topology, once: bool, dry_run: bool, json: bool) -> anyhow::Result<()> {
    use facepipe_control::reconcile::{self, Mode};
    let bus = Bus::connect(&topology.nats, "facepipe-cli", false).await?;
    let db = database(topology)?;
    if !once {
        eprintln!("reconciling every {:?} (re-driving after {:?} stalled); Ctrl-C stops", topology.reconcile.every, topology.stalled_after());
        let stop = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(reconcile::run(bus, db, topology.clone(), stop.clone()));
        facepipe_runtime::worker::shutdown_signal().await;
        stop.cancel();
        run.await?;
        return Ok(());
    }
    let mode = if dry_run { Mode::DryRun } else { Mode::Act };
    let report = reconcile::reconcile_once(&bus, &db, topology, mode).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if !report.ran {
        println!("another reconciler is running (a persist process, or another `pipeline reconcile`); nothing done");
        return Ok(());
    }
    println!("{} batch(es) running, {} stalled", report.active, report.stalled.len());
    for s in &report.stalled {
        let what = match (s.redriven, dry_run, s.marked) {
            (true, _, _) => "re-driven now",
            (false, true, false) => "would be marked stalled, and re-driven once unchanged for stalled_after",
            (false, true, true) => "stalled; would be re-driven if unchanged for stalled_after",
            (false, false, _) => "stalled; re-driven once unchanged for stalled_after",
        };
        println!("  {}  {:<10} {} pending  {what}", s.batch_id, s.status.as_str(), s.pending);
    }
    if !dry_run {
        println!(
            "re-drove {} image(s) and {} extract job(s); recorded {} lost failure(s)",
            report.redriven_images, report.redriven_jobs, report.recorded_failures
        );
    }
    Ok(())
}

async fn dead_letters(topology: &Topology, command: DeadLetterCommand) -> anyhow::Result<()> {
    let bus = Bus::connect(&topology.nats, "facepipe-cli", false).await?;
    match command {
        DeadLetterCommand::List { batch, after, limit, json } => {
            let (mut after, mut left, mut shown) = (after, limit.unwrap_or(usize::MAX), 0);
            let mut out = std::io::stdout().lock();
            while left > 0 {
                let filter = deadletters::Filter { batch: batch.as_deref(), after, limit: left.min(1000), ..Default::default() };
                let page = deadletters::list(&bus, topology, &filter).await?;
                for stored in &page.letters {
                    print_dead_letter(&mut out, stored, json)?;
                }
                (shown, left) = (shown + page.letters.len(), left - page.letters.len());
                match page.next_after {
                    Some(next) => after = next,
                    None => break,
                }
            }
            if !json {
                eprintln!("{shown} dead letter(s)");
            }
        }
        DeadLetterCommand::Replay { batch, id, all } => {
            let db = database(topology)?;
            let n = if !id.is_empty() {
                let letters = deadletters::get(&bus, topology, &id).await?;
                if letters.len() != id.len() {
                    bail!("no dead letter with some of the ids {id:?}");
                }
                deadletters::replay(&bus, &db, topology, &letters).await?
            } else if batch.is_some() || all {
                deadletters::replay_all(&bus, &db, topology, batch.as_deref()).await?
            } else {
                bail!("say which: --batch B, --id ID..., or --all");
            };
            println!("replayed {n} dead letter(s)");
        }
    }
    Ok(())
}

fn print_dead_letter(out: &mut impl std::io::Write, stored: &deadletters::Stored, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(stored)?)?;
    } else {
        let l = &stored.letter;
        writeln!(
            out,
            "{:>6}  {}  {:<7}  batch={} image={} attempts={}  {}",
            stored.id,
            l.time.format("%Y-%m-%d %H:%M:%S"),
            l.stage,
            l.batch_id.as_deref().unwrap_or("-"),
            l.image_id.as_deref().unwrap_or("-"),
            l.attempts,
            l.error
        )?;
    }
    Ok(())
}

/// Runs each stage binary as child processes, restarts any that die, and
/// stops them all with SIGTERM on Ctrl-C or SIGTERM.
async fn up(
    topology_path: &Path,
    topology: &Topology,
    flags: BTreeMap<StageName, usize>,
) -> anyhow::Result<()> {
    // The topology's `replicas` per stage, overridden by `--replicas stage=n`.
    let replicas: BTreeMap<StageName, usize> =
        StageName::ALL.iter().map(|s| (*s, flags.get(s).copied().unwrap_or(topology.stage(*s).replicas))).collect();
    let mut group = StageGroup::spawn(topology_path, topology, &replicas, &[])?;
    eprintln!("running {} stage processes; Ctrl-C stops them", group.len());
    let mut stop = std::pin::pin!(facepipe_runtime::worker::shutdown_signal());
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => group.restart_exited()?,
        }
    }
    eprintln!("stopping stages");
    group.stop().await
}
