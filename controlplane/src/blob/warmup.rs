//! `spool warmup PATH`: loads the blobs below a path of the mount into the cache ahead
//! of a job (a model, a dataset), in the background, with progress for the CLI. Runs
//! where the namespace runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use spool_fuse_shim::Namespace;

/// One warmup and its progress.
#[derive(Debug)]
pub struct Warmup {
    pub path: String,
    started: Instant,
    files: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
    /// The walk (listing) is over and `files` / `bytes_total` are final.
    walked: AtomicBool,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Warmup {
    /// Starts warming `path` (a mount path, "" for all) on a thread of its own.
    pub fn start(ns: Arc<Namespace>, path: String) -> Arc<Warmup> {
        let w = Arc::new(Warmup {
            path,
            started: Instant::now(),
            files: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            walked: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let me = Arc::clone(&w);
        let spawned = std::thread::Builder::new()
            .name("spool-warmup".into())
            .spawn(move || {
                if let Err(e) = me.run(&ns) {
                    tracing::warn!(path = %me.path, error = %e, "warmup failed");
                    *me.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                me.finished.store(true, Ordering::Release);
            });
        if let Err(e) = spawned {
            *w.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            w.finished.store(true, Ordering::Release);
        }
        w
    }

    fn run(&self, ns: &Namespace) -> Result<(), String> {
        let files = ns
            .blob_walk(&self.path)
            .map_err(|e| format!("walking {:?}: {e}", self.path))?;
        let total: u64 = files.iter().map(|f| f.1).sum();
        self.files.store(files.len() as u64, Ordering::Relaxed);
        self.bytes_total.store(total, Ordering::Relaxed);
        self.walked.store(true, Ordering::Release);
        let done = |b: u64| {
            self.bytes_done.fetch_add(b, Ordering::Relaxed);
        };
        ns.fill_all(&files, &done).map_err(|e| e.to_string())?;
        tracing::info!(path = %self.path, files = files.len(), bytes = total, ms = self.started.elapsed().as_millis() as u64, "warmup done");
        Ok(())
    }

    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    pub fn status(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "path": self.path,
            "listing": !self.walked.load(Ordering::Acquire),
            "files": g(&self.files),
            "bytes_total": g(&self.bytes_total),
            "bytes_done": g(&self.bytes_done),
            "elapsed_ms": self.started.elapsed().as_millis() as u64,
            "finished": self.finished(),
            "error": *self.error.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}
