//! `pipeline bench --account`: where each millisecond of CPU per image goes, by
//! process and by operation.
//!
//! Timing the stages from inside cannot see nats-server, PostgreSQL, the kernel
//! or the allocator, and the machine is too noisy for differences of a
//! millisecond. So a system-wide `perf record` samples every CPU at a fixed rate
//! during the floor and during the pipeline's run, and each sample goes into a
//! category by the process it hit and the symbol it was in (libjpeg, ONNX
//! Runtime, serde_json, async-nats, a nats-server consumer's pull requests, the
//! kernel's network stack...). A sample is 1/rate of a CPU second, so a
//! category's samples give its CPU milliseconds per image. The floor's column is
//! the same work with no queue, database or store; the `extra` column is what
//! the pipeline adds to it.
//!
//! NATS messages and PostgreSQL commits per image are counted beside it (from
//! nats-server's monitoring endpoint and `pg_stat_database`): how many round
//! trips each stage makes, which the CPU alone does not say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _};

/// Samples per second per CPU: enough for 0.1 ms per image over a few hundred
/// images, little enough that perf itself takes under 1% of the machine.
pub const SAMPLE_HZ: u32 = 999;

/// Who a sample hit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The in-process floor (this process, while the floor runs).
    Floor,
    /// A stage process (`extract`, `detect`, ...), replicas together.
    Stage(String),
    /// The NATS server.
    Nats,
    /// PostgreSQL's processes.
    Postgres,
    /// This process while the pipeline runs: submitting and waiting for the batch.
    Client,
    /// Everything else on the machine (kernel threads, other services).
    Other,
}

impl Role {
    fn label(&self) -> String {
        match self {
            Role::Floor => "floor".into(),
            Role::Stage(s) => s.clone(),
            Role::Nats => "nats".into(),
            Role::Postgres => "postgres".into(),
            Role::Client => "client".into(),
            Role::Other => "other".into(),
        }
    }
}

/// A running system-wide `perf record`.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

impl Recording {
    /// Starts sampling every CPU into `dir/<name>.data`.
    pub fn start(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let data = dir.join(format!("{name}.data"));
        let child = Command::new("perf")
            .args(["record", "--all-cpus", "--freq", &SAMPLE_HZ.to_string(), "--quiet", "--output"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting `perf record` (--account needs perf: apt-get install linux-perf)")?;
        // perf needs a moment to open its events; samples before that would be lost.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Self { child, data })
    }

    /// Stops sampling and reads every sample back: `(pid, comm, symbol, dso)`.
    pub fn finish(self) -> anyhow::Result<Vec<Sample>> {
        // SAFETY: kill(2) on the child we spawned and have not reaped; SIGINT makes perf write its file.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = self.child.wait_with_output()?;
        if !self.data.is_file() {
            bail!("perf record wrote nothing ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let script = Command::new("perf")
            .args(["script", "--fields", "comm,pid,ip,sym,dso", "--input"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("running `perf script`")?;
        let _ = std::fs::remove_file(&self.data);
        let text = String::from_utf8_lossy(&script.stdout);
        Ok(text.lines().filter_map(Sample::parse).collect())
    }
}

/// One perf sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Process id (0: the idle task).
    pub pid: u32,
    /// The thread's name.
    pub comm: String,
    /// Function name, demangled (`[unknown]` when perf could not tell).
    pub sym: String,
    /// The binary or library it is in (`[kernel.kallsyms]` for the kernel).
    pub dso: String,
}

impl Sample {
    /// Parses a line of `perf script --fields comm,pid,ip,sym,dso`:
    /// `detect  5123  7f3a2b1c4d5e onnxruntime::Foo::bar (/usr/lib/libonnxruntime.so)`.
    fn parse(line: &str) -> Option<Sample> {
        let line = line.trim_end();
        let open = line.rfind(" (")?;
        let dso = line[open + 2..].strip_suffix(')')?.to_string();
        let tokens: Vec<&str> = line[..open].split_whitespace().collect();
        // The comm may hold spaces: the pid is the first number followed by a hex address.
        let at = (1..tokens.len().saturating_sub(1)).find(|&i| {
            tokens[i].bytes().all(|b| b.is_ascii_digit()) && tokens[i + 1].bytes().all(|b| b.is_ascii_hexdigit())
        })?;
        Some(Sample {
            comm: tokens[..at].join(" "),
            pid: tokens[at].parse().ok()?,
            sym: tokens[at + 2..].join(" "),
            dso,
        })
    }
}

/// The operation a sample of this role, symbol and library belongs to.
pub fn category(role: &Role, sym: &str, dso: &str) -> &'static str {
    if dso.contains("kernel") || dso.ends_with(".ko") {
        return kernel_category(sym);
    }
    let any = |words: &[&str]| contains_any(sym, words);
    match role {
        Role::Nats => {
            if any(&["runtime.gc", "runtime.scanobject", "runtime.mallocgc", "runtime.markroot", "runtime.sweep", "runtime.greyobject", "runtime.findObject", "runtime.memclr", "runtime.mspan", "runtime.(*mspan)", "runtime.(*mheap)", "runtime.(*mcache)", "runtime.heapBits", "runtime.bulkBarrier", "runtime.wbBuf", "runtime.scanblock", "runtime.(*gcWork)", "runtime.typedmemmove", "runtime.newobject", "runtime.makeslice", "runtime.growslice", "runtime.mapassign", "runtime.memmove"]) {
                "nats-server: Go allocation and GC"
            } else if sym.starts_with("runtime.") || sym.starts_with("internal/") || sym.starts_with("sync.") || sym.starts_with("time.") {
                "nats-server: Go scheduler, timers, locks"
            } else if any(&["aiting", "NextMsgReq", "nextMsgReq", "NextReq", "waitQueue", "Heartbeat", "pullRequest", "processNextMsg"]) {
                "nats-server: pull requests"
            } else if any(&["Ack", "ack", "Nak", "Term", "InProgress", "updateDelivered"]) && sym.contains("consumer") {
                "nats-server: acks"
            } else if any(&["(*fileStore)", "(*msgBlock)", "(*memStore)", "(*stream)", "highwayhash", "(*jetStream)", "(*Account)", "jsa"]) {
                "nats-server: publish, dedupe, file store"
            } else if sym.contains("(*consumer)") {
                "nats-server: delivery to consumers"
            } else if any(&["(*client)", "(*Server)", "Sublist", "sublist", "(*level)", "bufio", "net.", "syscall."]) {
                "nats-server: protocol and routing"
            } else {
                "nats-server: other"
            }
        }
        Role::Postgres => {
            if any(&["XLog", "xlog", "Wal", "WAL", "Commit", "pg_fsync", "issue_xlog", "fsync"]) {
                "postgres: WAL and commit"
            } else {
                "postgres: parse, plan, execute"
            }
        }
        _ => stage_category(sym, dso),
    }
}

/// Whether `text` contains any of `words`: how symbols and libraries are matched.
fn contains_any(text: &str, words: &[&str]) -> bool {
    words.iter().any(|w| text.contains(w))
}

fn stage_category(sym: &str, dso: &str) -> &'static str {
    let any = |words: &[&str]| contains_any(sym, words);
    let lib = |words: &[&str]| contains_any(dso, words);
    if lib(&["libjpeg", "libturbojpeg", "libopencv", "libonnxruntime", "libpng", "libtiff", "libwebp", "libgomp", "libtbb", "libIlm", "libopenjp", "libgdal", "libz.so", "liblapack", "libblas", "libopenblas"])
        || any(&["facepipe_vision", "jpeg_region", "image::", "png::", "zune_", "fdeflate", "jpeg_encoder", "imagesize", "kamadak", "exif::"])
    {
        "image work (decode, detect, crop, encode)"
    } else if any(&["malloc", "free", "realloc", "calloc", "_int_", "arena", "tcache", "memalign", "sysmalloc", "systrim", "unlink_chunk", "consolidate", "__rust_alloc", "__rust_dealloc", "__rdl_", "alloc::raw_vec", "drop_in_place"]) {
        "allocation (malloc, free, drops)"
    } else if any(&["memcpy", "memmove", "memset", "memcmp", "bcmp"]) {
        "copies (memcpy, memset)"
    } else if any(&["serde_json", "serde::", "ryu::", "itoa::"]) {
        "JSON (serde_json)"
    } else if any(&["async_nats", "nuid"]) {
        "NATS client (async-nats)"
    } else if any(&["tokio_postgres", "postgres_protocol", "postgres_types", "deadpool", "fallible_iterator"]) {
        "PostgreSQL client"
    } else if any(&["object_store", "reqwest", "hyper", "h2::", "rustls", "ring::"]) {
        "object store and HTTP"
    } else if any(&["zip::", "crc32fast", "flate2", "miniz_oxide"]) {
        "ZIP"
    } else if any(&["tracing", "metrics", "sharded_slab", "opentelemetry"]) {
        "tracing and metrics"
    } else if any(&["tokio::", "mio::", "futures", "parking_lot", "crossbeam", "pthread_", "__lll_", "sched_yield", "epoll", "syscall", "__GI___poll", "__libc_recv", "__libc_send", "__read", "__write", "sendmsg", "recvmsg"]) {
        "tokio runtime, locks, syscalls"
    } else if dso.contains("libc") || dso.contains("ld-linux") || any(&["std::", "core::", "alloc::", "bytes::", "hashbrown", "memchr", "<T as ", "chrono", "uuid"]) {
        "standard library, hashing, strings"
    } else {
        "other (stage code, unresolved)"
    }
}

fn kernel_category(sym: &str) -> &'static str {
    let any = |words: &[&str]| contains_any(sym, words);
    if any(&["tcp_", "sock", "skb", "ip_", "ipv", "net_", "netif", "napi", "loopback", "__dev_", "inet", "unix_", "__sys_send", "__sys_recv", "udp", "nf_", "dst_", "neigh"]) {
        "kernel: network (loopback TCP)"
    } else if any(&["ext4", "filemap", "vfs_", "generic_file", "iomap", "jbd2", "page_cache", "folio", "xfs", "btrfs", "ovl_", "fsync", "writeback", "blk_", "bio", "dentry", "inode", "path_", "d_lookup", "link_path", "lookup", "file", "fs_", "copy_page_to_iter", "copy_page_from_iter", "virtio_blk", "nvme", "block"]) {
        "kernel: files and page cache"
    } else if any(&["page_fault", "clear_page", "anonymous", "handle_mm", "mmap", "munmap", "zap_", "pages", "rmqueue", "lru", "pte", "pmd", "tlb", "vma", "mm_", "memcg", "madvise", "brk", "copy_user", "rep_movs", "rep_stos", "memcpy", "memset"]) {
        "kernel: memory (faults, mapping, copies)"
    } else if any(&["schedule", "futex", "switch", "epoll", "wake", "ttwu", "enqueue", "dequeue", "hrtimer", "tick", "timer", "sched", "select_task", "update_curr", "update_load", "pick_next", "idle", "poll", "load_balance", "rcu", "irq", "apic", "nanosleep", "clock"]) {
        "kernel: scheduling, wakeups, timers"
    } else {
        "kernel: syscalls and other"
    }
}

/// CPU per image by role and category.
#[derive(Debug, Default)]
pub struct Account {
    /// (category, role) -> samples.
    cells: BTreeMap<(&'static str, Role), u64>,
    /// Images the pipeline run handled (the floor's count is the same).
    images: usize,
}

/// Which role each pid has during one recording.
pub struct Roles {
    /// Stage processes: pid -> stage name.
    pub stages: BTreeMap<u32, String>,
    /// nats-server's pid, when known.
    pub nats: Option<u32>,
    /// This process's role while recording (the floor, or the client).
    pub this: Role,
}

impl Roles {
    fn of(&self, sample: &Sample) -> Option<Role> {
        if sample.pid == 0 {
            return None; // an idle CPU
        }
        if let Some(stage) = self.stages.get(&sample.pid) {
            return Some(Role::Stage(stage.clone()));
        }
        if Some(sample.pid) == self.nats || sample.comm.starts_with("nats-server") {
            return Some(Role::Nats);
        }
        if sample.pid == std::process::id() {
            return Some(self.this.clone());
        }
        if sample.comm == "postgres" {
            return Some(Role::Postgres);
        }
        if sample.comm.starts_with("perf") {
            return None; // the measurement itself
        }
        Some(Role::Other)
    }
}

impl Account {
    /// An account of `images` images.
    pub fn new(images: usize) -> Self {
        Self { images, ..Self::default() }
    }

    /// Adds one recording's samples, each given its role by `roles`.
    pub fn add(&mut self, samples: &[Sample], roles: &Roles) {
        for s in samples {
            if let Some(role) = roles.of(s) {
                *self.cells.entry((category(&role, &s.sym, &s.dso), role)).or_default() += 1;
            }
        }
    }

    fn ms(&self, samples: u64) -> f64 {
        samples as f64 * 1000.0 / f64::from(SAMPLE_HZ) / self.images.max(1) as f64
    }

    /// CPU ms per image of one role in one category (every category with `None`).
    #[cfg(test)]
    fn ms_per_image(&self, role: &Role, category: Option<&str>) -> f64 {
        self.ms(self.cells.iter().filter(|((c, r), _)| r == role && category.is_none_or(|x| x == *c)).map(|(_, n)| n).sum())
    }

    /// The account as a table: a row per category, a column per role, then the
    /// pipeline's total and its extra over the floor.
    pub fn table(&self) -> String {
        let roles: Vec<Role> = {
            let mut r: Vec<Role> = self.cells.keys().map(|(_, r)| r.clone()).collect();
            r.sort();
            r.dedup();
            r
        };
        let mut rows: BTreeMap<&'static str, BTreeMap<Role, u64>> = BTreeMap::new();
        for ((c, r), n) in &self.cells {
            *rows.entry(c).or_default().entry(r.clone()).or_default() += n;
        }
        let pipeline = |by: &BTreeMap<Role, u64>| by.iter().filter(|(r, _)| **r != Role::Floor).map(|(_, n)| n).sum::<u64>();
        let mut ordered: Vec<(&'static str, &BTreeMap<Role, u64>)> = rows.iter().map(|(c, by)| (*c, by)).collect();
        ordered.sort_by_key(|(_, by)| std::cmp::Reverse(pipeline(by).max(by.get(&Role::Floor).copied().unwrap_or(0))));
        let mut out = format!("{:<44}", "CPU ms per image");
        for r in &roles {
            out += &format!("{:>9}", r.label());
        }
        out += &format!("{:>10}{:>8}\n", "pipeline", "extra");
        let mut totals: BTreeMap<Role, u64> = BTreeMap::new();
        for (c, by) in &ordered {
            let p = self.ms(pipeline(by));
            let f = self.ms(by.get(&Role::Floor).copied().unwrap_or(0));
            if p < 0.05 && f < 0.05 {
                continue;
            }
            out += &format!("{c:<44}");
            for r in &roles {
                let n = by.get(r).copied().unwrap_or(0);
                *totals.entry(r.clone()).or_default() += n;
                out += &if n == 0 { format!("{:>9}", "") } else { format!("{:>9.2}", self.ms(n)) };
            }
            out += &format!("{p:>10.2}{:>+8.2}\n", p - f);
        }
        out += &format!("{:<44}", "all");
        for r in &roles {
            out += &format!("{:>9.2}", self.ms(totals.get(r).copied().unwrap_or(0)));
        }
        let p = self.ms(totals.iter().filter(|(r, _)| **r != Role::Floor).map(|(_, n)| n).sum());
        let f = self.ms(totals.get(&Role::Floor).copied().unwrap_or(0));
        out += &format!("{p:>10.2}{:>+8.2}\n", p - f);
        out
    }
}

/// Messages each named NATS connection sent and received, from nats-server's
/// monitoring endpoint (`/connz`): connection name -> (in, out).
pub async fn nats_messages(monitor: &str) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let url = format!("{}/connz?limit=1024", monitor.trim_end_matches('/'));
    let body = reqwest::get(&url).await?.error_for_status()?.text().await?;
    let connz: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("reading {url}"))?;
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for c in connz["connections"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("unnamed").to_string();
        let entry = by_name.entry(name).or_default();
        // Seen from the server: the client's publishes, pull requests and acks are its `in_msgs`.
        entry.0 += c["in_msgs"].as_u64().unwrap_or(0);
        entry.1 += c["out_msgs"].as_u64().unwrap_or(0);
    }
    Ok(by_name)
}

/// Messages per image by connection between two `/connz` readings, as lines.
pub fn nats_table(before: &BTreeMap<String, (u64, u64)>, after: &BTreeMap<String, (u64, u64)>, images: usize) -> String {
    let mut out = format!("{:<24}{:>16}{:>16}\n", "NATS messages per image", "from the client", "to the client");
    for (name, (i1, o1)) in after {
        let (i0, o0) = before.get(name).copied().unwrap_or((0, 0));
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / images.max(1) as f64;
        out += &format!("{name:<24}{:>16.2}{:>16.2}\n", per(*i1, i0), per(*o1, o0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_script_lines() {
        let s = Sample::parse("   tokio-runtime-w  5123     7f3a2b1c4d5e serde_json::de::from_str::h12ab (/work/target/release/detect)").unwrap();
        assert_eq!((s.pid, s.comm.as_str(), s.sym.as_str()), (5123, "tokio-runtime-w", "serde_json::de::from_str::h12ab"));
        assert_eq!(s.dso, "/work/target/release/detect");
        // A comm with a space, a symbol with spaces, the kernel.
        let s = Sample::parse("Web Content 77 ffffffff8a1b2c3d <T as core::fmt::Debug>::fmt ([kernel.kallsyms])").unwrap();
        assert_eq!((s.pid, s.comm.as_str(), s.sym.as_str(), s.dso.as_str()), (77, "Web Content", "<T as core::fmt::Debug>::fmt", "[kernel.kallsyms]"));
        assert!(Sample::parse("garbage").is_none());
    }

    #[test]
    fn sorts_samples_into_operations() {
        let stage = Role::Stage("detect".into());
        assert_eq!(category(&stage, "jpeg_idct_islow", "/usr/lib/x86_64-linux-gnu/libjpeg.so.62"), "image work (decode, detect, crop, encode)");
        assert_eq!(category(&stage, "_int_malloc", "/usr/lib/x86_64-linux-gnu/libc.so.6"), "allocation (malloc, free, drops)");
        assert_eq!(category(&stage, "async_nats::connection::Connection::poll_read_op", "detect"), "NATS client (async-nats)");
        assert_eq!(category(&stage, "tcp_sendmsg_locked", "[kernel.kallsyms]"), "kernel: network (loopback TCP)");
        let nats = Role::Nats;
        assert_eq!(category(&nats, "github.com/nats-io/nats-server/v2/server.(*consumer).processNextMsgRequest", "nats-server"), "nats-server: pull requests");
        assert_eq!(category(&nats, "github.com/nats-io/nats-server/v2/server.(*consumer).processAckMsg", "nats-server"), "nats-server: acks");
        assert_eq!(category(&nats, "runtime.scanobject", "nats-server"), "nats-server: Go allocation and GC");
        assert_eq!(category(&Role::Postgres, "XLogInsertRecord", "postgres"), "postgres: WAL and commit");
    }

    #[test]
    fn counts_milliseconds_per_image_by_role() {
        let sample = |pid: u32, comm: &str, sym: &str| Sample { pid, comm: comm.into(), sym: sym.into(), dso: "x".into() };
        let roles = Roles { stages: BTreeMap::from([(10, "crop".to_string())]), nats: Some(20), this: Role::Client };
        let samples: Vec<Sample> =
            std::iter::repeat_n(sample(10, "crop", "serde_json::x"), 999).chain([sample(0, "swapper", "idle"), sample(20, "nats-server", "runtime.gcDrain")]).collect();
        let mut account = Account::new(10);
        account.add(&samples, &roles);
        // 999 samples at 999 Hz: one CPU second over 10 images.
        assert!((account.ms_per_image(&Role::Stage("crop".into()), Some("JSON (serde_json)")) - 100.0).abs() < 1e-9);
        assert!((account.ms_per_image(&Role::Nats, None) - 0.1).abs() < 0.01);
        let table = account.table();
        assert!(table.contains("JSON (serde_json)") && table.contains("nats"), "{table}");
    }
}
