//! Stage processes run as children of the CLI (`pipeline up`, `pipeline bench`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use facepipe_core::topology::{StageName, Topology};
use tokio::process::{Child, Command};

/// One child process of a stage.
pub struct StageProcess {
    /// `detect#0`, `detect#1`, ...
    pub name: String,
    command: Command,
    /// The running process.
    pub child: Child,
}

/// Resource use of one process, read from `/proc` while it runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size in MiB (`VmHWM`).
    pub peak_rss_mib: f64,
    /// Resident set size now, in MiB (`VmRSS`).
    pub rss_mib: f64,
}

impl Usage {
    /// CPU time and peak memory of process `pid`, from `/proc`; with
    /// `with_children`, its exited children's CPU too (PostgreSQL's backends).
    pub fn of(pid: u32, with_children: bool) -> Self {
        let ticks = 100.0; // USER_HZ on Linux
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let cpu = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // cutime and cstime follow: the CPU of its children that have exited.
        let children = if with_children { cpu(13) + cpu(14) } else { 0.0 };
        Usage { cpu_seconds: (cpu(11) + cpu(12) + children) / ticks, peak_rss_mib: kib("VmHWM:") / 1024.0, rss_mib: kib("VmRSS:") / 1024.0 }
    }
}

/// Every process named `postgres` (the postmaster and its backends), as `pgrep -x postgres`.
pub fn postgres_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            pids.push(pid);
        }
    }
    pids
}

/// The stage processes of one machine.
pub struct StageGroup {
    processes: Vec<StageProcess>,
}

/// Directory holding the stage binaries: the one this binary is in.
pub fn binary_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.parent().context("binary directory")?.to_owned())
}

impl StageGroup {
    /// Starts `replicas[stage]` (default 1) processes of every stage.
    /// Each replica gets its own metrics port: the stage's port + 10 * replica.
    pub fn spawn(
        topology_path: &Path,
        topology: &Topology,
        replicas: &BTreeMap<StageName, usize>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn_from(&binary_dir()?, topology_path, topology, replicas, env)
    }

    /// As [`StageGroup::spawn`], with the stage binaries of `dir` (another
    /// build's, for `pipeline bench --baseline-bin`).
    pub fn spawn_from(
        dir: &Path,
        topology_path: &Path,
        topology: &Topology,
        replicas: &BTreeMap<StageName, usize>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut processes = Vec::new();
        for stage in StageName::ALL {
            let bin = dir.join(stage.as_str());
            if !bin.is_file() {
                bail!("{} not found: build the workspace (cargo build --release)", bin.display());
            }
            for replica in 0..replicas.get(&stage).copied().unwrap_or(1) {
                let mut command = Command::new(&bin);
                command.arg("--topology").arg(topology_path).envs(env.iter().copied());
                if let Some(addr) = topology.stage(stage).metrics_addr {
                    if let Ok(mut socket) = addr.parse::<std::net::SocketAddr>() {
                        if socket.port() != 0 {
                            socket.set_port(socket.port() + 10 * replica as u16);
                            command.env("PIPELINE_METRICS_ADDR", socket.to_string());
                        }
                    }
                }
                let child = command.spawn().with_context(|| format!("starting {}", bin.display()))?;
                processes.push(StageProcess { name: format!("{stage}#{replica}"), command, child });
            }
        }
        Ok(Self { processes })
    }

    /// Number of processes.
    pub fn len(&self) -> usize {
        self.processes.len()
    }

    /// The processes.
    pub fn processes(&self) -> &[StageProcess] {
        &self.processes
    }

    /// Starts again every process that has exited.
    pub fn restart_exited(&mut self) -> anyhow::Result<()> {
        for p in &mut self.processes {
            if let Some(status) = p.child.try_wait()? {
                eprintln!("{} exited ({status}); restarting", p.name);
                p.child = p.command.spawn()?;
            }
        }
        Ok(())
    }

    /// CPU time and peak memory of a running process.
    pub fn usage(p: &StageProcess) -> Usage {
        p.child.id().map(|pid| Usage::of(pid, false)).unwrap_or_default()
    }

    /// Sends SIGTERM to every process and waits for each to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for p in &self.processes {
            if let Some(pid) = p.child.id() {
                // SAFETY: kill(2) with a pid we spawned and have not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for p in &mut self.processes {
            let status = p.child.wait().await?;
            eprintln!("{} stopped ({status})", p.name);
        }
        Ok(())
    }
}

/// `STAGE=N` (`--replicas detect=2`).
pub fn parse_replicas(s: &str) -> Result<(StageName, usize), String> {
    let (name, n) = s.split_once('=').ok_or("expected STAGE=N")?;
    let stage = StageName::ALL
        .into_iter()
        .find(|st| st.as_str() == name)
        .ok_or_else(|| format!("unknown stage `{name}`"))?;
    let n = n.parse::<usize>().map_err(|e| e.to_string())?;
    Ok((stage, n))
}
