//! `pipeline-lab`: the measuring tools, apart from the operator's CLI.
//!
//! `pipeline-lab eval` scores the detect stage's settings on labelled photos and
//! `pipeline-lab bench` measures throughput against the in-process floor. They link
//! OpenCV and ONNX Runtime (the floor and eval run detection in process), which the
//! operator's `pipeline` does not; `pipeline eval` and `pipeline bench` run this
//! binary, so both spellings work.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Parser, Subcommand};
use facepipe_core::topology::{Topology, TOPOLOGY_ENV};
use facepipe_lab::bench;

#[derive(Parser)]
#[command(name = "pipeline-lab", version, about = "Measure the face-crop pipeline: detection quality and throughput")]
struct Cli {
    /// Topology file describing the deployment.
    #[arg(long, short, global = true, env = TOPOLOGY_ENV, default_value = "topology.toml")]
    topology: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score the detect stage's settings on labelled photos (precision, recall, count accuracy).
    Eval {
        /// Manifest of labelled photos (shared/data/faces/manifest.json format).
        #[arg(long)]
        manifest: PathBuf,
        /// Fail (exit 1) when precision is below this.
        #[arg(long)]
        min_precision: Option<f64>,
        /// Fail (exit 1) when recall is below this.
        #[arg(long)]
        min_recall: Option<f64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Measure YuNet alone, as a deployment with `second_pass.enabled = false` runs
        /// (without it, eval measures exactly what the topology's detect runs).
        #[arg(long)]
        no_second_pass: bool,
    },
    /// Measure end-to-end throughput on a folder of photos against the in-process floor.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    facepipe_runtime::app::init_logging(facepipe_runtime::app::LogFormat::Human, "warn");
    let topology = Topology::load(&cli.topology)?;
    match cli.command {
        Command::Eval { manifest, min_precision, min_recall, json, no_second_pass } => {
            let mut topology = topology;
            if no_second_pass {
                topology.stages.detect.params.second_pass.enabled = false;
            }
            eval(&topology, &manifest, min_precision, min_recall, json).await
        }
        Command::Bench(args) => bench::run(&cli.topology, &topology, args).await,
    }
}

/// `pipeline-lab eval`: the report, and a non-zero exit below the floors given.
async fn eval(
    topology: &Topology,
    manifest: &Path,
    min_precision: Option<f64>,
    min_recall: Option<f64>,
    json: bool,
) -> anyhow::Result<()> {
    let params = topology.stages.detect.params.clone();
    let manifest = manifest.to_owned();
    facepipe_vision::detect::set_opencv_threads(1);
    let report = tokio::task::spawn_blocking(move || facepipe_lab::eval::evaluate(&manifest, &params)).await??;
    let t = &report.total;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let d = &topology.stages.detect.params;
        println!(
            "detector {} ({}) on {} at width {} (upscale {}), score >= {}, nms {}: {:.1} ms per image (decode + detect, one thread)",
            report.detector, report.model, report.engine, d.width, d.upscale, report.score_threshold, d.nms_threshold, report.ms_per_image
        );
        if let (Some(model), Some(pass)) = (&report.second_pass, d.second_pass.active()) {
            println!(
                "second pass {model} (score >= {}) on the {} of {} photos where YuNet was unsure (a box scoring {} to {})",
                pass.score_threshold, report.second_pass_images, report.images, pass.uncertain_from, pass.uncertain_to
            );
        }
        println!("{:<18} {:>6} {:>6} {:>5} {:>5} {:>9} {:>7} {:>6} {:>10}", "source", "images", "faces", "TP", "FP", "precision", "recall", "F1", "count-acc");
        let row = |name: &str, t: &facepipe_lab::eval::Tally| {
            let count = t.count_accuracy().map(|c| format!("{c:.3} ({})", t.count_images)).unwrap_or_else(|| "-".into());
            println!(
                "{name:<18} {:>6} {:>6} {:>5} {:>5} {:>9.3} {:>7.3} {:>6.3} {:>10}",
                t.images, t.faces, t.true_positives, t.false_positives, t.precision(), t.recall(), t.f1(), count
            );
        };
        for (source, tally) in &report.by_source {
            row(source, tally);
        }
        row("all", t);
        let mut lower = facepipe_lab::eval::MIN_COUNTABLE_FACE;
        let mut line = String::from("recall by face size (smaller side, px):");
        for (upper, size) in facepipe_lab::eval::SIZE_BUCKETS.iter().zip(&report.by_size) {
            let range = if upper.is_finite() { format!("{lower}-{upper}") } else { format!(">={lower}") };
            line += &format!("  {range} {:.3} ({})", size.recall(), size.faces);
            lower = *upper;
        }
        println!("{line}");
        println!("peak RSS {:.0} MiB (this process, one thread)", report.peak_rss_mib);
    }
    let mut failed = Vec::new();
    if let Some(min) = min_precision.filter(|m| t.precision() < *m) {
        failed.push(format!("precision {:.3} < {min}", t.precision()));
    }
    if let Some(min) = min_recall.filter(|m| t.recall() < *m) {
        failed.push(format!("recall {:.3} < {min}", t.recall()));
    }
    if !failed.is_empty() {
        bail!("below the floor: {}", failed.join(", "));
    }
    Ok(())
}

