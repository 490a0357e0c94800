//! `pipeline bench --scale N`: the real deployment on one batch of N entries,
//! made by repeating a folder of photos, watched while it runs: images/s and
//! CPU per image for each tenth of the batch (so costs that grow with the
//! batch show), peak memory of every process, the database's size, the largest
//! stream. With `--ingest-only`, only extract runs: storing the originals,
//! publishing every detect job, registering every image row. With `--queries`,
//! the reads operators make are timed afterwards against the batch's rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use facepipe_control::batches::{Batches, ZipUpload};
use facepipe_core::domain::{BatchStatus, Priority};
use facepipe_core::keys;
use facepipe_core::messages::{self, DeadLetter};
use facepipe_core::topology::{StageName, Topology};
use facepipe_runtime::bus::Bus;
use facepipe_ledger::{Db, PageStart};
use facepipe_runtime::store::Store;

use pipeline::processes::{StageGroup, Usage};

/// Options of a scale run (part of `pipeline bench`'s flags).
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Run one batch of this many entries, the corpus's photos repeated, and report
    /// per tenth of the batch instead of against the floor.
    #[arg(long)]
    pub scale: Option<usize>,
    /// With --scale: run extract alone and stop once the batch is ingested.
    #[arg(long, requires = "scale")]
    pub ingest_only: bool,
    /// With --scale: afterwards, time status, stats, a late results page, streaming
    /// every result and listing dead letters (after planting --dead-letters of them).
    #[arg(long, requires = "scale")]
    pub queries: bool,
    /// With --queries: dead letters to plant before timing the dead-letter list.
    #[arg(long, default_value_t = 10_000)]
    pub dead_letters: usize,
    /// The nats-server's pid, to count its CPU and memory (scripts/bench passes it).
    #[arg(long)]
    pub nats_pid: Option<u32>,
}

/// One look at the running deployment.
struct Sample {
    at: f64,
    /// Images with an outcome (or, ingesting only, detect jobs published).
    done: u64,
    /// CPU seconds per watched process, in [`Watched`] order.
    cpu: Vec<f64>,
}

/// The processes whose CPU is followed: the stages, then nats-server and PostgreSQL.
struct Watched {
    names: Vec<String>,
    pids: Vec<Vec<u32>>,
    /// Whether exited children count (PostgreSQL's backends are children of the postmaster).
    with_children: Vec<bool>,
}

impl Watched {
    fn cpu(&self) -> Vec<f64> {
        self.pids
            .iter()
            .zip(&self.with_children)
            .map(|(pids, children)| pids.iter().map(|p| Usage::of(*p, *children).cpu_seconds).sum())
            .collect()
    }
}

/// A stored ZIP of `n` entries cycling through `photos`, spooled next to the object
/// store so submitting it is a rename, not a copy.
fn write_zip(photos: &[(String, Vec<u8>)], n: usize, dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let file = tempfile::NamedTempFile::new_in(dir)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file.reopen()?));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    for i in 0..n {
        let (name, bytes) = &photos[i % photos.len()];
        zip.start_file(format!("{:03}/{i:07}-{name}", i / 10_000 % 1000), options)?;
        zip.write_all(bytes)?;
    }
    zip.finish()?.flush()?;
    Ok(file)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Linear interpolation of the sampled values at the moment `done` reached `target`.
fn at_done(samples: &[Sample], target: f64) -> (f64, Vec<f64>) {
    let i = samples.iter().position(|s| s.done as f64 >= target).unwrap_or(samples.len() - 1);
    if i == 0 {
        return (samples[0].at, samples[0].cpu.clone());
    }
    let (a, b) = (&samples[i - 1], &samples[i]);
    let span = (b.done - a.done) as f64;
    let f = if span > 0.0 { ((target - a.done as f64) / span).clamp(0.0, 1.0) } else { 1.0 };
    let cpu = a.cpu.iter().zip(&b.cpu).map(|(x, y)| x + (y - x) * f).collect();
    (a.at + (b.at - a.at) * f, cpu)
}

/// Runs the scale benchmark and prints its figures.
pub async fn run(topology_path: &Path, topology: &Topology, corpus: &[PathBuf], args: &ScaleArgs) -> anyhow::Result<()> {
    let n = args.scale.context("--scale N")?;
    let photos: Vec<(String, Vec<u8>)> = corpus
        .iter()
        .map(|p| Ok((p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(p)?)))
        .collect::<anyhow::Result<_>>()?;
    let mean = photos.iter().map(|(_, b)| b.len()).sum::<usize>() / photos.len();
    println!("scale       {n} entries from {} photos (mean {} KiB), second pass {}", photos.len(), mean / 1024,
        if topology.stages.detect.params.second_pass.active().is_some() { "on" } else { "off" });

    let store = Store::open(&topology.object_store)?;
    let spool_dir = topology.object_store.url.strip_prefix("file://").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let made = Instant::now();
    let zip = tokio::task::spawn_blocking({
        let dir = spool_dir.clone();
        move || write_zip(&photos, n, &dir)
    })
    .await??;
    let zip_bytes = zip.as_file().metadata()?.len();
    println!("archive     {:.0} MiB, written in {:.1}s", mib(zip_bytes), made.elapsed().as_secs_f64());

    let replicas: BTreeMap<StageName, usize> = if args.ingest_only {
        StageName::ALL.iter().map(|s| (*s, usize::from(*s == StageName::Extract))).collect()
    } else {
        BTreeMap::new()
    };
    let group = StageGroup::spawn(topology_path, topology, &replicas, &[("RUST_LOG", "warn")])?;
    let db = Db::connect(&topology.postgres.url, 2)?;
    let bus = Bus::connect(&topology.nats, "facepipe-bench", false).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut watched = Watched { names: Vec::new(), pids: Vec::new(), with_children: Vec::new() };
    for p in group.processes() {
        watched.names.push(p.name.clone());
        watched.pids.push(p.child.id().into_iter().collect());
        watched.with_children.push(false);
    }
    if let Some(pid) = args.nats_pid {
        watched.names.push("nats-server".into());
        watched.pids.push(vec![pid]);
        watched.with_children.push(false);
    }
    watched.names.push("postgres".into());
    watched.pids.push(pipeline::processes::postgres_pids());
    watched.with_children.push(true);

    let batch_id = keys::derived_batch_id(&["scale", &n.to_string(), &chrono::Utc::now().to_rfc3339()]);
    let service = Batches::new(topology.clone(), bus.clone(), db.clone(), store);
    let streams: Vec<String> = StageName::ALL.iter().map(|s| topology.stream_name(*s)).collect();
    let detect_stream = topology.stream_name(StageName::Detect);
    let every = if n >= 200_000 { Duration::from_secs(1) } else { Duration::from_millis(250) };

    let started = Instant::now();
    service.submit_zip(batch_id.clone(), "bench".into(), Priority::DEFAULT, ZipUpload::Spooled(zip), "bench").await?;
    let mut samples = vec![Sample { at: 0.0, done: 0, cpu: watched.cpu() }];
    let mut largest: (String, u64, u64) = (String::new(), 0, 0);
    let mut ingested_at = None;
    let status = loop {
        tokio::time::sleep(every).await;
        let status = db.batch_status(&batch_id).await?.context("the batch vanished")?;
        let mut detect_messages = 0;
        for name in &streams {
            let mut stream = bus.js.get_stream(name).await?;
            let state = stream.info().await?.state.clone();
            if name == &detect_stream {
                detect_messages = state.messages;
            }
            if state.bytes > largest.1 {
                largest = (name.clone(), state.bytes, state.messages);
            }
        }
        let at = started.elapsed().as_secs_f64();
        if ingested_at.is_none() && status.status != BatchStatus::Ingesting {
            ingested_at = Some(at);
        }
        let done = if args.ingest_only { detect_messages } else { status.processed as u64 };
        samples.push(Sample { at, done, cpu: watched.cpu() });
        let finished = if args.ingest_only { status.status != BatchStatus::Ingesting } else { status.status.is_finished() };
        if finished {
            break status;
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let usage: Vec<Usage> = group.processes().iter().map(StageGroup::usage).collect();
    let nats_usage = args.nats_pid.map(|p| Usage::of(p, false));
    let db_bytes = crate::ledger::database_bytes(&db).await?;

    if args.ingest_only {
        println!(
            "ingest      {n} images in {wall:.1}s ({:.0} images/s): originals stored, detect jobs published, image rows registered",
            n as f64 / wall
        );
    } else {
        println!(
            "pipeline    {n} images in {wall:.1}s ({:.1} images/s end to end; ingest done at {:.1}s), status {}, {} failed",
            n as f64 / wall,
            ingested_at.unwrap_or(wall),
            status.status,
            status.failed
        );
    }
    let unit = if args.ingest_only { "ingested" } else { "completed" };
    println!("per tenth of the batch ({unit} images), CPU ms per image:");
    print!("{:<7} {:>9}", "tenth", "images/s");
    for name in &watched.names {
        print!(" {name:>12}");
    }
    println!(" {:>9}", "all");
    let mut tenths = Vec::new();
    for k in 0..10 {
        let (t0, c0) = at_done(&samples, n as f64 * k as f64 / 10.0);
        let (t1, c1) = at_done(&samples, n as f64 * (k + 1) as f64 / 10.0);
        let images = n as f64 / 10.0;
        let per: Vec<f64> = c0.iter().zip(&c1).map(|(a, b)| (b - a) * 1000.0 / images).collect();
        let rate = images / (t1 - t0).max(1e-9);
        print!("{:<7} {rate:>9.1}", k + 1);
        for ms in &per {
            print!(" {ms:>12.2}");
        }
        let all: f64 = per.iter().sum();
        println!(" {all:>9.2}");
        tenths.push((rate, all));
    }
    let (first, middle, last) = (tenths[0], tenths[5], tenths[9]);
    println!(
        "last/first  images/s {:.2}x, CPU per image {:.2}x (middle tenth: {:.1} images/s, {:.2} ms)",
        last.0 / first.0,
        last.1 / first.1,
        middle.0,
        middle.1
    );
    println!("{:<12} {:>14}", "process", "peak RSS MiB");
    for (p, u) in group.processes().iter().zip(&usage) {
        println!("{:<12} {:>14.1}", p.name, u.peak_rss_mib);
    }
    if let Some(u) = nats_usage {
        println!("{:<12} {:>14.1}", "nats-server", u.peak_rss_mib);
    }
    println!("database    {:.0} MiB ({:.0} bytes per image)", mib(db_bytes as u64), db_bytes as f64 / n as f64);
    println!("streams     largest {} at {:.0} MiB, {} messages", largest.0, mib(largest.1), largest.2);
    group.stop().await?;

    if args.queries {
        queries(topology_path, topology, &db, &bus, &batch_id, n, args.dead_letters).await?;
    }
    if !args.ingest_only && status.status != BatchStatus::Completed {
        bail!("batch {batch_id} ended {}", status.status);
    }
    Ok(())
}

/// Median wall time of `runs` calls, in milliseconds.
async fn median_ms<F, Fut, T>(runs: usize, mut f: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f().await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Runs this binary with `args`, its output thrown away; returns (wall ms, peak RSS MiB).
/// The peak is the child's own `VmHWM`, read while it runs: `wait4`'s `ru_maxrss`
/// would also count this process's memory, which the child's fork copied.
fn cli(topology_path: &Path, args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--topology")
        .arg(topology_path)
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut peak: f64 = 0.0;
    let status = loop {
        peak = peak.max(Usage::of(child.id(), false).peak_rss_mib);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("pipeline {args:?} failed: {status}");
    }
    Ok((wall, peak))
}

fn median_cli(topology_path: &Path, args: &[&str], runs: usize) -> anyhow::Result<(f64, f64)> {
    let mut runs: Vec<(f64, f64)> = (0..runs).map(|_| cli(topology_path, args)).collect::<anyhow::Result<_>>()?;
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(runs[runs.len() / 2])
}

/// One HTTP GET; fails unless the answer is 200.
async fn get(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let answer = client.get(url).send().await?;
    if !answer.status().is_success() {
        bail!("GET {url}: {}", answer.status());
    }
    answer.bytes().await?;
    Ok(())
}

/// Times the reads operators make against a batch of `n` image rows.
async fn queries(topology_path: &Path, topology: &Topology, db: &Db, bus: &Bus, batch_id: &str, n: usize, letters: usize) -> anyhow::Result<()> {
    // Dead letters naming the batch's images, as detect writes them.
    let subject = topology.dead_letter_subject(StageName::Detect);
    let planting = Instant::now();
    for i in 0..letters {
        let image_id = keys::image_id(i * n.max(1) / letters.max(1));
        let letter = DeadLetter {
            stage: "detect".into(),
            subject: topology.stages.detect.subject.clone(),
            payload: format!(r#"{{"batch_id":"{batch_id}","image_id":"{image_id}"}}"#),
            error: "planted by pipeline bench --queries".into(),
            permanent: true,
            attempts: 1,
            batch_id: Some(batch_id.to_string()),
            image_id: Some(image_id.clone()),
            time: chrono::Utc::now(),
        };
        bus.publish(&subject, &format!("bench-dead:{batch_id}:{i}"), messages::encode(&letter)).await?;
    }
    println!("queries     on {n} image rows, {letters} dead letters (planted in {:.1}s); median of 5 runs", planting.elapsed().as_secs_f64());

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut serve = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--topology")
        .arg(topology_path)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("PIPELINE_API_TOKEN")
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if get(&http, &format!("{base}/healthz")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_page = (n as i64 - 1) / 100 + 1;
    let page = 9000.min(last_page);
    let skip = (page - 1) * 100;
    let after = keys::image_id((skip as usize).saturating_sub(1));
    let status_url = format!("{base}/api/batch/status/{batch_id}");
    let page_url = format!("{base}/api/batch/{batch_id}/results?page={page}&pageSize=100");
    let after_url = format!("{base}/api/batch/{batch_id}/results?after={after}&pageSize=100");
    let row = |what: &str, ms: f64, note: &str| println!("  {what:<46} {ms:>9.1} ms  {note}");

    row("status (query)", median_ms(5, || async { Ok(db.batch_status(batch_id).await?) }).await?, "target < 20 ms");
    row("status (HTTP GET /api/batch/status/{id})", median_ms(5, || get(&http, &status_url)).await?, "target < 20 ms");
    row("status (`pipeline status`, a whole process)", median_cli(topology_path, &["status", batch_id], 5)?.0, "");
    row(
        "stats (queues, replicas, failures)",
        median_ms(5, || async {
            Ok(facepipe_control::stats::stage_stats(bus, db, topology).await?)
        })
        .await?,
        "target < 200 ms",
    );
    row("stats (`pipeline stats`, a whole process)", median_cli(topology_path, &["stats"], 5)?.0, "");
    row(&format!("results page {page} of 100 (query)"), median_ms(5, || async { Ok(db.results_page(batch_id, &PageStart::Offset(skip), 100).await?) }).await?, "target < 200 ms");
    row(
        &format!("results page {page} (HTTP, ?page={page})"),
        median_ms(5, || get(&http, &page_url)).await?,
        "target < 200 ms",
    );
    row(
        &format!("results page {page} (HTTP, ?after= cursor)"),
        median_ms(5, || get(&http, &after_url)).await?,
        "",
    );
    let (ms, rss) = median_cli(topology_path, &["results", batch_id], 3)?;
    row(&format!("`pipeline results` streaming all {n}"), ms, &format!("peak RSS {rss:.0} MiB (median of 3)"));
    row("`dead-letters list --limit 100`", median_cli(topology_path, &["dead-letters", "list", "--limit", "100"], 5)?.0, "");
    let tail = letters.saturating_sub(100).to_string();
    row("`dead-letters list --after <last 100> --limit 100`", median_cli(topology_path, &["dead-letters", "list", "--after", &tail, "--limit", "100"], 5)?.0, "");
    let (ms, rss) = median_cli(topology_path, &["dead-letters", "list", "--batch", batch_id, "--json"], 3)?;
    row(&format!("`dead-letters list --batch` all {letters}"), ms, &format!("peak RSS {rss:.0} MiB (median of 3)"));

    // What the dashboard reads, over HTTP.
    let dashboard = [
        ("batches, newest 25 (GET /api/batches)", format!("{base}/api/batches?limit=25")),
        // The first page is the worst case for a planner that misjudges a new batch.
        ("results page 1 (HTTP, ?page=1)", format!("{base}/api/batch/{batch_id}/results?page=1&pageSize=20")),
        ("results by status, page 1 (?status=pending)", format!("{base}/api/batch/{batch_id}/results?status=pending&pageSize=20")),
        (
            "results by status, deep (?status=pending&after=)",
            format!("{base}/api/batch/{batch_id}/results?status=pending&after={after}&pageSize=20"),
        ),
        ("failures by reason (GET .../failures)", format!("{base}/api/batch/{batch_id}/failures")),
        ("one image (GET .../images/{id})", format!("{base}/api/batch/{batch_id}/images/{after}")),
        ("stats, live (GET /api/stats)", format!("{base}/api/stats")),
        ("dead letters of the batch, 50 (GET /api/dead-letters)", format!("{base}/api/dead-letters?batch={batch_id}&limit=50")),
    ];
    for (what, url) in &dashboard {
        row(what, median_ms(5, || get(&http, url)).await?, "target < 200 ms");
    }
    let export_url = format!("{base}/api/batch/{batch_id}/export?format=csv");
    let ms = median_ms(3, || async { Ok(http.get(&export_url).send().await?.error_for_status()?.bytes().await?.len()) }).await?;
    let serve_rss = serve.id().map_or(0.0, |pid| pipeline::processes::Usage::of(pid, false).peak_rss_mib);
    row(&format!("export all {n} as CSV (HTTP, streamed)"), ms, &format!("server peak RSS {serve_rss:.0} MiB (median of 3)"));
    serve.kill().await.ok();
    Ok(())
}
