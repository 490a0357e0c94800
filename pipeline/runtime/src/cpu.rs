//! The process's CPU threads: blocking image work (OpenCV, ONNX Runtime) runs
//! here, off the async reactor.
//!
//! A fixed set, one thread per worker slot (rather than tokio's growing
//! blocking pool), keeps one detector per thread and the memory that goes
//! with it bounded. The pool belongs to the stage's [`crate::Ctx`], so every
//! caller gets the same behaviour.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::error::StageError;

type CpuJob = Box<dyn FnOnce() + Send>;

/// A pool of named CPU threads that grows on demand and never shrinks (idle threads cost little).
pub struct CpuPool {
    tx: mpsc::Sender<CpuJob>,
    rx: Arc<Mutex<mpsc::Receiver<CpuJob>>>,
    threads: Mutex<usize>,
}

impl CpuPool {
    /// A pool with `threads` threads running.
    pub fn new(threads: usize) -> Self {
        // Unbounded, yet never long: each worker slot has at most one job queued or running.
        let (tx, rx) = mpsc::channel::<CpuJob>();
        let pool = Self { tx, rx: Arc::new(Mutex::new(rx)), threads: Mutex::new(0) };
        pool.grow_to(threads);
        pool
    }

    /// Grows the pool to `wanted` threads.
    pub fn grow_to(&self, wanted: usize) {
        let mut threads = self.threads.lock().expect("cpu pool lock");
        while *threads < wanted.max(1) {
            let rx = self.rx.clone();
            std::thread::Builder::new()
                .name(format!("cpu-{}", *threads))
                .spawn(move || loop {
                    let job = rx.lock().expect("cpu pool lock").recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn a CPU thread");
            *threads += 1;
        }
    }

    /// Threads running.
    pub fn threads(&self) -> usize {
        *self.threads.lock().expect("cpu pool lock")
    }

    /// Runs `work` on one of the pool's threads and waits for its result. A
    /// panic is a permanent failure of that message, not of the process.
    pub async fn run<T, F>(&self, work: F) -> Result<T, StageError>
    where
        F: FnOnce() -> Result<T, StageError> + Send + 'static,
        T: Send + 'static,
    {
        let lost = |e: &dyn std::fmt::Display| StageError::transient(format!("worker thread failed: {e}"));
        // The worker thread logs inside the caller's span (batch and image ids).
        let span = tracing::Span::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: CpuJob = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| span.in_scope(work)));
            let _ = tx.send(result);
        });
        self.tx.send(job).map_err(|e| lost(&e))?;
        match rx.await.map_err(|e| lost(&e))? {
            Ok(result) => result,
            Err(_) => Err(StageError::permanent("image processing panicked")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_named_pool_thread_and_a_panic_fails_only_its_job() {
        let pool = CpuPool::new(2);
        assert_eq!(pool.threads(), 2);
        let name = pool.run(|| Ok(std::thread::current().name().map(String::from))).await.unwrap();
        assert!(name.is_some_and(|n| n.starts_with("cpu-")));
        let panicked = pool.run::<(), _>(|| panic!("boom")).await.unwrap_err();
        assert!(panicked.is_permanent());
        assert_eq!(pool.run(|| Ok(41 + 1)).await.unwrap(), 42);
        pool.grow_to(3);
        assert_eq!(pool.threads(), 3);
    }
}
