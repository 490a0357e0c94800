//! Temporary files named after the process that owns them
//! (`facepipe-<pid>-<purpose>-XXXX`), so that a process starting up can remove
//! what a crashed one left behind without touching a live replica's files.
//! Files are removed when dropped; [`sweep`] handles the crash case.

use std::io;
use std::path::Path;

use tempfile::NamedTempFile;

const PREFIX: &str = "facepipe-";

/// A new temporary file in `dir`, owned by this process.
pub fn file_in(dir: &Path, purpose: &str) -> io::Result<NamedTempFile> {
    tempfile::Builder::new().prefix(&format!("{PREFIX}{}-{purpose}-", std::process::id())).tempfile_in(dir)
}

/// Removes the temporary files in `dir` whose owning process no longer runs;
/// returns how many. Errors (a missing directory, a file removed meanwhile) are skipped.
pub fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else { continue };
        if !is_running(pid) && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(file = %entry.path().display(), pid, "removed a temporary file left by a stopped process");
            removed += 1;
        }
    }
    removed
}

/// The owning PID encoded in a scratch file's name.
fn owner(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn is_running(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_files_of_stopped_processes() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let orphan = dir.path().join(format!("facepipe-{dead}-download-abc"));
        std::fs::write(&orphan, b"left by a crash").unwrap();
        let live = file_in(dir.path(), "download").unwrap();
        let unrelated = dir.path().join("facepipe-notes.txt");
        std::fs::write(&unrelated, b"not ours").unwrap();

        assert_eq!(sweep(dir.path()), 1);
        assert!(!orphan.exists());
        assert!(live.path().exists(), "this process's file stays");
        assert!(unrelated.exists(), "names without a PID are not ours");
        assert_eq!(sweep(&dir.path().join("missing")), 0);
    }
}
