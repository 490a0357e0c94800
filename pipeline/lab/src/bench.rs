//! `pipeline bench`: throughput of the real deployment on a corpus of photos,
//! compared in the same run with the in-process floor (the same decode,
//! detect, crop and encode work in one process, with no queue, database or
//! object store), so the pipeline's overhead is a measured ratio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use facepipe_runtime::bus::Bus;
use facepipe_ledger::Db;
use facepipe_core::keys;
use facepipe_control::batches::{Batches, ZipUpload};
use facepipe_core::domain::{BatchStatus, Priority};
use facepipe_runtime::store::Store;
use facepipe_core::topology::{StageName, Topology};
use facepipe_vision::{crop, detect};

use pipeline::processes::{StageGroup, Usage};

/// Options of `pipeline bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Folder of photos (`.jpg`, `.jpeg`, `.png`), e.g. made by shared/bench/make_corpus.py.
    pub corpus: PathBuf,
    /// Processes per stage, e.g. `--replicas detect=2`.
    #[arg(long, value_parser = pipeline::processes::parse_replicas)]
    pub replicas: Vec<(StageName, usize)>,
    /// Worker threads of the in-process floor (default: the number of cores).
    #[arg(long)]
    pub floor_threads: Option<usize>,
    /// Skip the in-process floor.
    #[arg(long)]
    pub no_floor: bool,
    /// Also run the stage binaries of this folder (another build's), alternating
    /// with this build's on the same corpus, and print the paired ratios: how a
    /// change is measured on a noisy machine.
    #[arg(long)]
    pub baseline_bin: Option<PathBuf>,
    /// Pipeline runs of each build (A and B alternate round by round).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Account for the CPU per image by process and operation, with `perf`
    /// sampling the whole machine (docs/performance.md, "The account").
    #[arg(long)]
    pub account: bool,
    /// nats-server's monitoring address (`http://127.0.0.1:8222`), to count the
    /// messages of each connection per image.
    #[arg(long)]
    pub nats_monitor: Option<String>,
    /// A scale run instead (`--scale N`).
    #[command(flatten)]
    pub scale: crate::scale::ScaleArgs,
}

fn cpu_seconds_of_this_process() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Busy and total CPU seconds of the whole machine since boot, from `/proc/stat`
/// (every process: the stages, NATS, PostgreSQL, the kernel).
fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(((total - idle) / hz, total / hz))
}

fn corpus_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| keys::extension(&p.to_string_lossy()).is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.as_str())))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no photos in {}", dir.display());
    }
    Ok(files)
}

/// Decode + detect + crop + encode of every photo on `threads` threads; returns (wall, CPU) seconds.
fn floor(photos: &[Vec<u8>], topology: &Topology, threads: usize) -> anyhow::Result<(f64, f64)> {
    detect::set_opencv_threads(1);
    facepipe_runtime::app::tune_allocator();
    let next = AtomicUsize::new(0);
    let cpu0 = cpu_seconds_of_this_process();
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let d = &topology.stages.detect.params;
                    let c = &topology.stages.crop.params;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(bytes) = photos.get(i) else { return Ok(()) };
                        // As the detect stage does: landmarks measured again when crop aligns.
                        let found = detect::detect_faces_for(bytes, d, Some(c))?;
                        let chosen = crop::chosen_faces(&found.faces, c);
                        crop::crop_faces(bytes, &found.faces, &chosen, c, d.max_megapixels)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("floor worker panicked")?;
        }
        Ok(())
    })?;
    Ok((started.elapsed().as_secs_f64(), cpu_seconds_of_this_process() - cpu0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn write_stored_zip(files: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(out)?);
    // JPEGs do not compress: store them, as cameras' uploads usually are.
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for f in files {
        zip.start_file(f.file_name().unwrap().to_string_lossy(), options)?;
        zip.write_all(&std::fs::read(f)?)?;
    }
    zip.finish()?;
    Ok(())
}

/// What one end-to-end run of the pipeline measured.
struct RunFigures {
    images_per_s: f64,
    /// CPU ms per image: each stage process, then nats-server and PostgreSQL.
    cpu_ms: Vec<(String, f64)>,
}

impl RunFigures {
    fn total_ms(&self) -> f64 {
        self.cpu_ms.iter().map(|(_, ms)| ms).sum()
    }
}

/// The end-to-end part of a bench: the services, the ZIP and the options every run shares.
struct PipelineBench<'a> {
    topology_path: &'a Path,
    topology: &'a Topology,
    replicas: BTreeMap<StageName, usize>,
    zip_path: PathBuf,
    images: usize,
    floor_wall: Option<f64>,
    nats_pid: Option<u32>,
    nats_monitor: Option<String>,
    db: Db,
    service: Batches,
}

impl PipelineBench<'_> {
    /// One run from submit to completion with the stage binaries of `bin_dir`,
    /// printing its figures; samples the machine into `account` when given.
    async fn run(&self, bin_dir: &Path, label: &str, account: Option<&mut crate::account::Account>, scratch: &Path) -> anyhow::Result<RunFigures> {
        let n = self.images;
        let group = StageGroup::spawn_from(bin_dir, self.topology_path, self.topology, &self.replicas, &[("RUST_LOG", "warn")])?;
        // Let every stage bind its consumer and load its detector before the clock starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let services = |pid: Option<u32>| pid.map(|p| Usage::of(p, false).cpu_seconds).unwrap_or(0.0);
        let postgres = || pipeline::processes::postgres_pids().into_iter().map(|p| Usage::of(p, true).cpu_seconds).sum::<f64>();
        let messages0 = match &self.nats_monitor {
            Some(m) => Some(crate::account::nats_messages(m).await?),
            None => None,
        };
        let commits0 = crate::ledger::commits(&self.db).await?;
        let recording = match account {
            Some(_) => Some(crate::account::Recording::start(scratch, label)?),
            None => None,
        };
        // Readings start with the clock, after perf is up (its start is not the pipeline's CPU).
        let before: Vec<Usage> = group.processes().iter().map(StageGroup::usage).collect();
        let (nats0, pg0) = (services(self.nats_pid), postgres());
        let machine_before = machine_cpu_seconds();

        let batch_id = keys::derived_batch_id(&["bench", label, &chrono::Utc::now().to_rfc3339()]);
        let started = Instant::now();
        self.service.submit_zip(batch_id.clone(), "bench".into(), Priority::DEFAULT, ZipUpload::File(&self.zip_path), "bench").await?;
        let status = self.service.wait(&batch_id, Duration::from_millis(50), Duration::from_secs(3600)).await?;
        let wall = started.elapsed().as_secs_f64();
        let after: Vec<Usage> = group.processes().iter().map(StageGroup::usage).collect();
        let (nats1, pg1) = (services(self.nats_pid), postgres());
        let machine_after = machine_cpu_seconds();
        // After the readings: perf writing its samples out is not the pipeline's CPU.
        let samples = recording.map(|r| r.finish()).transpose()?;
        let stage_pids: BTreeMap<u32, String> = group
            .processes()
            .iter()
            .filter_map(|p| Some((p.child.id()?, p.name.split('#').next().unwrap_or(&p.name).to_string())))
            .collect();
        let latencies = crate::ledger::latencies(&self.db, &batch_id).await?;

        println!(
            "pipeline    {:.1} images/s end to end ({n} images, {wall:.2}s from submit to completion, {} failed){}",
            n as f64 / wall,
            status.failed,
            if label.is_empty() { String::new() } else { format!(" [{label}]") }
        );
        println!("latency     p50 {:.2}s  p99 {:.2}s  (extract registering an image -> its outcome recorded)", percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        let decided = self.db.results(&batch_id).await?;
        let second = decided.iter().filter(|r| r.detector == Some(facepipe_core::domain::Detector::Retinaface)).count();
        println!("second pass {second} of {} photos decided by RetinaFace ({:.0}%)", decided.len(), 100.0 * second as f64 / decided.len().max(1) as f64);
        if let Some(floor_wall) = self.floor_wall {
            println!("overhead    {:+.1}% wall time over the in-process floor", (wall / floor_wall - 1.0) * 100.0);
        }
        println!("{:<12} {:>14} {:>14}", "process", "CPU ms/image", "peak RSS MiB");
        let mut cpu_ms = Vec::new();
        let mut stages_ms = 0.0;
        for ((p, b), a) in group.processes().iter().zip(&before).zip(&after) {
            let ms = (a.cpu_seconds - b.cpu_seconds) * 1000.0 / n as f64;
            stages_ms += ms;
            cpu_ms.push((p.name.clone(), ms));
            println!("{:<12} {:>14.1} {:>14.1}", p.name, ms, a.peak_rss_mib);
        }
        // Where the overhead goes: the whole machine's CPU per image, and how busy it was.
        if let (Some((busy0, total0)), Some((busy1, total1))) = (machine_before, machine_after) {
            let busy_ms = (busy1 - busy0) * 1000.0 / n as f64;
            println!(
                "machine     {busy_ms:.1} ms CPU per image in all: stages {stages_ms:.1}, the rest (NATS, PostgreSQL, kernel, this client) {:.1}; cores {:.0}% busy",
                busy_ms - stages_ms,
                (busy1 - busy0) / (total1 - total0) * 100.0
            );
        }
        let (nats_ms, pg_ms) = ((nats1 - nats0) * 1000.0 / n as f64, (pg1 - pg0) * 1000.0 / n as f64);
        if self.nats_pid.is_some() {
            cpu_ms.push(("nats-server".into(), nats_ms));
        }
        cpu_ms.push(("postgres".into(), pg_ms));
        println!(
            "services    {}PostgreSQL (all its processes) {pg_ms:.1} ms CPU per image",
            if self.nats_pid.is_some() { format!("nats-server {nats_ms:.1}, ") } else { String::new() }
        );
        if let (Some(m0), Some(m)) = (messages0, &self.nats_monitor) {
            print!("{}", crate::account::nats_table(&m0, &crate::account::nats_messages(m).await?, n));
        }
        // PostgreSQL publishes its counters about once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        println!("database    {:.2} transactions committed per image", (crate::ledger::commits(&self.db).await? - commits0) as f64 / n as f64);
        if let (Some(account), Some(samples)) = (account, samples) {
            account.add(&samples, &crate::account::Roles { stages: stage_pids, nats: self.nats_pid, this: crate::account::Role::Client });
        }
        group.stop().await?;
        if status.status != BatchStatus::Completed {
            bail!("batch {batch_id} ended {}", status.status);
        }
        Ok(RunFigures { images_per_s: n as f64 / wall, cpu_ms })
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

/// Runs the benchmark and prints its figures.
pub async fn run(topology_path: &Path, topology: &Topology, args: BenchArgs) -> anyhow::Result<()> {
    let files = corpus_files(&args.corpus)?;
    if args.scale.scale.is_some() {
        return crate::scale::run(topology_path, topology, &files, &args.scale).await;
    }
    let n = files.len();
    let photos: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let mb = photos.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
    let (first_w, first_h) = imagesize::blob_size(&photos[0]).map(|s| (s.width, s.height)).unwrap_or((0, 0));
    println!("corpus      {} ({n} photos, {first_w}x{first_h}, {mb:.0} MB)", args.corpus.display());
    let d = &topology.stages.detect.params;
    println!(
        "settings    detector {:?} width {} score {} | crop {}x{} q{} {:?}",
        d.detector, d.width, d.score_threshold, topology.stages.crop.params.output_size,
        topology.stages.crop.params.output_size, topology.stages.crop.params.jpeg_quality,
        topology.stages.crop.params.policy
    );
    let scratch = tempfile::tempdir()?;
    let rounds = args.rounds.max(1);
    let mut account_a = args.account.then(|| crate::account::Account::new(n * rounds));
    let mut account_b = (args.account && args.baseline_bin.is_some()).then(|| crate::account::Account::new(n * rounds));

    let floor_result = if args.no_floor {
        None
    } else {
        let threads = args.floor_threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        let topo = topology.clone();
        let photos_ref = photos.clone();
        let recording = if args.account { Some(crate::account::Recording::start(scratch.path(), "floor")?) } else { None };
        let (wall, cpu) = tokio::task::spawn_blocking(move || floor(&photos_ref, &topo, threads)).await??;
        if let Some(recording) = recording {
            // The floor is the same work for both builds: in both accounts, once per round.
            let samples = recording.finish()?;
            let roles = crate::account::Roles { stages: BTreeMap::new(), nats: args.scale.nats_pid, this: crate::account::Role::Floor };
            for account in account_a.iter_mut().chain(account_b.iter_mut()) {
                for _ in 0..rounds {
                    account.add(&samples, &roles);
                }
            }
        }
        println!(
            "floor       {:.1} images/s in-process ({threads} threads, {wall:.2}s wall, {:.1} ms CPU per image)",
            n as f64 / wall,
            cpu * 1000.0 / n as f64
        );
        Some(wall)
    };
    drop(photos);

    // The real deployment: all four stages as processes, NATS, PostgreSQL, object store.
    let zip_path = scratch.path().join("corpus.zip");
    write_stored_zip(&files, &zip_path)?;
    let db = Db::connect(&topology.postgres.url, 2)?;
    let bus = Bus::connect(&topology.nats, "facepipe-bench", false).await?;
    let bench = PipelineBench {
        topology_path,
        topology,
        replicas: args.replicas.into_iter().collect(),
        zip_path,
        images: n,
        floor_wall: floor_result,
        nats_pid: args.scale.nats_pid,
        nats_monitor: args.nats_monitor,
        db: db.clone(),
        service: Batches::new(topology.clone(), bus, db, Store::open(&topology.object_store)?),
    };
    let this_build = pipeline::processes::binary_dir()?;
    let mut pairs: Vec<(RunFigures, RunFigures)> = Vec::new();
    for round in 1..=rounds {
        let (label_a, label_b) = if args.baseline_bin.is_some() { (format!("A, round {round}"), format!("B, round {round}")) } else { (String::new(), String::new()) };
        let a = bench.run(&this_build, &label_a, account_a.as_mut(), scratch.path()).await?;
        if let Some(baseline) = &args.baseline_bin {
            let b = bench.run(baseline, &label_b, account_b.as_mut(), scratch.path()).await?;
            pairs.push((a, b));
        }
    }
    if !pairs.is_empty() {
        println!("paired      A = this build, B = {}; medians of {} pairs", args.baseline_bin.as_ref().unwrap().display(), pairs.len());
        println!("{:<14}{:>10}{:>10}{:>10}", "", "A", "B", "A/B");
        let row = |name: &str, a: Vec<f64>, b: Vec<f64>| {
            let ratios: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a / b).collect();
            println!("{name:<14}{:>10.2}{:>10.2}{:>10.3}", median(a), median(b), median(ratios));
        };
        row("images/s", pairs.iter().map(|(a, _)| a.images_per_s).collect(), pairs.iter().map(|(_, b)| b.images_per_s).collect());
        row("CPU ms/image", pairs.iter().map(|(a, _)| a.total_ms()).collect(), pairs.iter().map(|(_, b)| b.total_ms()).collect());
        for (i, (name, _)) in pairs[0].0.cpu_ms.iter().enumerate() {
            row(name, pairs.iter().map(|(a, _)| a.cpu_ms[i].1).collect(), pairs.iter().map(|(_, b)| b.cpu_ms.get(i).map_or(f64::NAN, |x| x.1)).collect());
        }
    }
    for (name, account) in [("A (this build)", account_a), ("B (baseline)", account_b)] {
        if let Some(account) = account {
            println!("account     {}{} images, perf at {} Hz on every CPU", if args.baseline_bin.is_some() { format!("{name}, ") } else { String::new() }, n * rounds, crate::account::SAMPLE_HZ);
            print!("{}", account.table());
        }
    }
    Ok(())
}
