//! The uploader: drains dirty files of the namespace to the object store.
//!
//! It runs where the namespace runs (the single node, or the cluster's namespace
//! owner) and holds no state of its own that matters: each cycle scans the namespace
//! (`Namespace::blob_scan`), deletes the blobs of removed files (tombstones), then
//! uploads dirty files that rested `writeback_delay_ms` after their last change and
//! whose writer closed or fsynced them, oldest first, `files_in_flight` at a time.
//! Large files go as blocks (`part_size`, `parts_in_flight` at once) read from the
//! cache one block at a time, so nothing is held whole in memory. An upload counts
//! only if the file did not change while it ran (`Namespace::blob_mark`); a failed one
//! is retried after a doubling, jittered delay. A restart resumes from the log.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rustc_hash::FxHashMap;
use serde::Serialize;
use spool_fuse_shim::meta::blob::{BlobFile, BlobState};
use spool_fuse_shim::meta::now_ns;
use spool_fuse_shim::Namespace;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::config::BlobConfig;

/// Gives the namespace when it runs on this node (always on a single node; while
/// this node owns it in a cluster).
pub type NsSource = Arc<dyn Fn() -> Option<Arc<Namespace>> + Send + Sync>;

/// Tombstones handled per cycle (their removal is one namespace log batch).
const GONE_PER_CYCLE_MAX: usize = 256;

/// First retry delay; doubles per failure up to `retry_delay_max_ms`.
const RETRY_DELAY_MIN_MS: u64 = 250;

/// Counters, cumulative since start (exported by `status` and `/metrics`).
#[derive(Debug, Default)]
struct Stats {
    bytes_uploaded: AtomicU64,
    files_uploaded: AtomicU64,
    put_requests: AtomicU64,
    block_requests: AtomicU64,
    commit_requests: AtomicU64,
    delete_requests: AtomicU64,
    errors: AtomicU64,
    /// Uploads not recorded because the file changed while they ran.
    changed_during_upload: AtomicU64,
}

/// The last scan's view, for `status` and `spool flush --wait`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Backlog {
    pub dirty_files: u64,
    pub dirty_bytes: u64,
    /// Dirty files still written (not closed or fsynced since their last change).
    pub writing_files: u64,
    pub flushing_files: u64,
    /// Files whose name cannot be a blob key (not UTF-8, or a segment the store
    /// rejects): they stay in the cache only.
    pub unkeyable_files: u64,
    /// Changed files under a directory in `cache-only` mode (`user.spool.mode`):
    /// never uploaded, not counted as dirty.
    pub cache_only_files: u64,
    pub oldest_dirty_age_ms: u64,
    pub tombstones: u64,
}

#[derive(Debug)]
struct Retry {
    failures: u32,
    next: Instant,
    error: String,
}

#[derive(Debug)]
struct Inner {
    cfg: BlobConfig,
    store: Arc<dyn ObjectStore>,
    kick: Notify,
    stats: Stats,
    /// Path prefixes a `flush` asked for: their files skip the writeback delay.
    urgent: Mutex<Vec<String>>,
    retry: Mutex<FxHashMap<u64, Retry>>,
    last_error: Mutex<Option<String>>,
}

/// A running uploader.
#[derive(Clone)]
pub struct Writeback {
    inner: Arc<Inner>,
    source: NsSource,
}

impl std::fmt::Debug for Writeback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writeback")
            .field("store", &self.inner.store.to_string())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `path` is `prefix` or lies below it ("" is everything).
fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

impl Writeback {
    pub fn new(cfg: BlobConfig, store: Arc<dyn ObjectStore>, source: NsSource) -> Writeback {
        Writeback {
            inner: Arc::new(Inner {
                cfg,
                store,
                kick: Notify::new(),
                stats: Stats::default(),
                urgent: Mutex::new(Vec::new()),
                retry: Mutex::new(FxHashMap::default()),
                last_error: Mutex::new(None),
            }),
            source,
        }
    }

    /// The object key of a mount path, or why it cannot be one.
    fn key(&self, path: &str) -> Result<ObjPath, String> {
        super::store::object_key(&self.inner.cfg.prefix, path)
    }

    /// Files under `prefix` (a mount path, "" for all) skip the delay, and failing
    /// ones retry now.
    pub fn flush(&self, prefix: &str) {
        let prefix = prefix.trim_matches('/').to_owned();
        {
            let mut u = lock(&self.inner.urgent);
            if !u.contains(&prefix) {
                u.push(prefix);
            }
        }
        lock(&self.inner.retry).clear();
        self.inner.kick.notify_one();
    }

    /// What is left to upload under `prefix`, from a fresh scan; `None` when the
    /// namespace does not run here.
    pub fn backlog(&self, prefix: &str) -> Option<Backlog> {
        let ns = (self.source)()?;
        let scan = ns.blob_scan();
        let prefix = prefix.trim_matches('/');
        let files: Vec<&BlobFile> = scan
            .files
            .iter()
            .filter(|f| f.path.as_deref().is_none_or(|p| under(p, prefix)))
            .collect();
        let mut b = summarize(files.iter().copied(), |p| self.key(p).is_ok());
        b.tombstones = scan.gone.len() as u64;
        Some(b)
    }

    /// Counters and the last error, for `status`.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.inner.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "store": self.inner.store.to_string(),
            "prefix": self.inner.cfg.prefix,
            "mode": self.inner.cfg.mode,
            "bytes_uploaded": g(&s.bytes_uploaded),
            "files_uploaded": g(&s.files_uploaded),
            "requests": {
                "put": g(&s.put_requests),
                "put_block": g(&s.block_requests),
                "put_block_list": g(&s.commit_requests),
                "delete": g(&s.delete_requests),
            },
            "errors": g(&s.errors),
            "changed_during_upload": g(&s.changed_during_upload),
            "retrying_files": lock(&self.inner.retry).len(),
            "last_error": *lock(&self.inner.last_error),
        })
    }

    /// Prometheus text for the counters and the backlog.
    pub fn prometheus(&self) -> String {
        let s = &self.inner.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP spool_blob_{name} {help}\n# TYPE spool_blob_{name} {kind}\nspool_blob_{name} {v}\n"
            ));
        };
        for (name, help, a) in [
            (
                "bytes_uploaded_total",
                "Bytes sent to the object store.",
                &s.bytes_uploaded,
            ),
            ("files_uploaded_total", "Files uploaded.", &s.files_uploaded),
            (
                "put_requests_total",
                "Single-request uploads.",
                &s.put_requests,
            ),
            (
                "block_requests_total",
                "Blocks (parts) uploaded.",
                &s.block_requests,
            ),
            (
                "commit_requests_total",
                "Block lists committed.",
                &s.commit_requests,
            ),
            (
                "delete_requests_total",
                "Blobs deleted.",
                &s.delete_requests,
            ),
            ("errors_total", "Failed store requests.", &s.errors),
        ] {
            line(name, "counter", help, g(a));
        }
        if let Some(b) = self.backlog("") {
            line(
                "dirty_files",
                "gauge",
                "Files not yet in the store.",
                b.dirty_files,
            );
            line(
                "dirty_bytes",
                "gauge",
                "Bytes of files not yet in the store.",
                b.dirty_bytes,
            );
            line(
                "oldest_dirty_age_ms",
                "gauge",
                "Age of the oldest change not yet in the store (flush lag).",
                b.oldest_dirty_age_ms,
            );
        }
        out
    }

    /// Uploads until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.inner.cfg.scan_interval_ms);
        tracing::info!(store = %self.inner.store, prefix = %self.inner.cfg.prefix, "blob writeback running");
        loop {
            if *stop.borrow() {
                return;
            }
            self.cycle(false).await;
            tokio::select! {
                _ = self.inner.kick.notified() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// At a clean shutdown: uploads every dirty file, ignoring the delay, for at most
    /// `shutdown_flush_ms`. Returns what is left.
    pub async fn drain(&self) -> Option<Backlog> {
        let deadline = Instant::now() + Duration::from_millis(self.inner.cfg.shutdown_flush_ms);
        loop {
            let left = self.backlog("")?;
            if left.dirty_files == left.unkeyable_files && left.tombstones == 0 {
                return Some(left);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    dirty_files = left.dirty_files,
                    dirty_bytes = left.dirty_bytes,
                    "blob: shutdown flush ran out of time; the rest uploads after the next start"
                );
                return Some(left);
            }
            let before = self.inner.stats.errors.load(Ordering::Relaxed);
            self.cycle(true).await;
            if self.inner.stats.errors.load(Ordering::Relaxed) != before {
                tokio::time::sleep(Duration::from_millis(RETRY_DELAY_MIN_MS)).await;
            }
        }
    }

    fn fail(&self, ino: Option<u64>, error: String) {
        self.inner.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %error, "blob");
        *lock(&self.inner.last_error) = Some(error.clone());
        if let Some(ino) = ino {
            let max = self.inner.cfg.retry_delay_max_ms;
            let mut r = lock(&self.inner.retry);
            let e = r.entry(ino).or_insert(Retry {
                failures: 0,
                next: Instant::now(),
                error: String::new(),
            });
            e.failures = e.failures.saturating_add(1);
            let base = RETRY_DELAY_MIN_MS
                .saturating_mul(1 << e.failures.min(20))
                .min(max);
            // Jitter: between half and all of the delay, so files that failed together
            // do not retry together.
            let delay = base / 2 + rand::random::<u64>() % (base / 2 + 1);
            e.next = Instant::now() + Duration::from_millis(delay);
            e.error = error;
        }
    }

    /// One pass: tombstones, then the files that are due. `all` ignores the delay.
    async fn cycle(&self, all: bool) {
        let Some(ns) = (self.source)() else { return };
        ns.blob_enable();
        let scan = {
            let ns = Arc::clone(&ns);
            match tokio::task::spawn_blocking(move || ns.blob_scan()).await {
                Ok(s) => s,
                Err(e) => return self.fail(None, format!("namespace scan: {e}")),
            }
        };
        let live: HashSet<&str> = scan
            .files
            .iter()
            .filter_map(|f| f.path.as_deref())
            .collect();
        let mut gone_done = Vec::new();
        // Bounded: the tombstones dropped in one cycle go in one log batch.
        for (name, key) in scan.gone.iter().take(GONE_PER_CYCLE_MAX) {
            // A live file has the key now: its own upload replaces the blob.
            if !live.contains(key.as_str()) {
                let Ok(loc) = self.key(key) else {
                    gone_done.push(name.clone());
                    continue;
                };
                self.inner
                    .stats
                    .delete_requests
                    .fetch_add(1, Ordering::Relaxed);
                match self.inner.store.delete(&loc).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        self.fail(None, format!("delete {loc}: {e}"));
                        break;
                    }
                }
            }
            gone_done.push(name.clone());
        }
        if !gone_done.is_empty() {
            let ns2 = Arc::clone(&ns);
            match tokio::task::spawn_blocking(move || ns2.blob_forget_gone(&gone_done)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return self.fail(None, format!("namespace: dropping tombstones: {e}"))
                }
                Err(e) => return self.fail(None, format!("namespace: {e}")),
            }
        }

        let now = now_ns();
        let delay_ns = (self.inner.cfg.writeback_delay_ms as i64).saturating_mul(1_000_000);
        let urgent = lock(&self.inner.urgent).clone();
        let mut due: Vec<BlobFile> = {
            let retry = lock(&self.inner.retry);
            let t = Instant::now();
            scan.files
                .iter()
                .filter(|f| f.is_dirty() && !f.writing && !f.flushing && !f.cache_only)
                .filter(|f| f.path.as_deref().is_some_and(|p| self.key(p).is_ok()))
                .filter(|f| retry.get(&f.ino).is_none_or(|r| r.next <= t))
                .filter(|f| {
                    let p = f.path.as_deref().unwrap_or("");
                    all || now.saturating_sub(f.ctime_ns) >= delay_ns
                        || urgent.iter().any(|u| under(p, u))
                })
                .cloned()
                .collect()
        };
        due.sort_by_key(|f| f.ctime_ns);
        // Flush requests whose files are all clean (or unkeyable) are done.
        lock(&self.inner.urgent).retain(|u| {
            scan.files.iter().any(|f| {
                f.is_dirty()
                    && !f.cache_only
                    && f.path
                        .as_deref()
                        .is_some_and(|p| under(p, u) && self.key(p).is_ok())
            })
        });
        let mut tasks = JoinSet::new();
        let mut due = due.into_iter();
        loop {
            while tasks.len() < self.inner.cfg.files_in_flight {
                let Some(f) = due.next() else { break };
                let me = self.clone();
                let ns = Arc::clone(&ns);
                tasks.spawn(async move { me.upload_file(ns, f).await });
            }
            if tasks.join_next().await.is_none() {
                break;
            }
        }
    }

    /// Uploads one file and records it. Failures are counted and scheduled for retry.
    async fn upload_file(&self, ns: Arc<Namespace>, f: BlobFile) {
        let path = f.path.clone().unwrap_or_default();
        let Ok(loc) = self.key(&path) else { return };
        ns.blob_set_flushing(f.ino, true);
        let t0 = Instant::now();
        let sent = self.send(&ns, &f, &loc).await;
        ns.blob_set_flushing(f.ino, false);
        let etag = match sent {
            Ok(e) => e,
            Err(e) => return self.fail(Some(f.ino), format!("upload {loc}: {e}")),
        };
        let state = BlobState {
            key: path,
            etag,
            size: f.size,
            ctime_ns: f.ctime_ns,
        };
        let ino = f.ino;
        let ns2 = Arc::clone(&ns);
        let marked = tokio::task::spawn_blocking(move || ns2.blob_mark(ino, &state)).await;
        match marked {
            Ok(Ok(true)) => {
                lock(&self.inner.retry).remove(&f.ino);
                self.inner
                    .stats
                    .files_uploaded
                    .fetch_add(1, Ordering::Relaxed);
                self.inner
                    .stats
                    .bytes_uploaded
                    .fetch_add(f.size, Ordering::Relaxed);
                tracing::debug!(key = %loc, bytes = f.size, ms = t0.elapsed().as_millis() as u64, "blob: uploaded");
            }
            Ok(Ok(false)) => {
                // Changed (or removed) while uploading: the next cycle sends it again.
                self.inner
                    .stats
                    .changed_during_upload
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => self.fail(Some(f.ino), format!("namespace: recording {loc}: {e}")),
            Err(e) => self.fail(Some(f.ino), format!("namespace: {e}")),
        }
    }

    /// Reads `[off, off + len)` of `ino` from the cache (short at its end).
    async fn read(ns: &Arc<Namespace>, ino: u64, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let ns = Arc::clone(ns);
        tokio::task::spawn_blocking(move || {
            let step = ns.io_size_max();
            let mut out = Vec::with_capacity(len as usize);
            let mut at = off;
            while at < off + len {
                let want = step.min(off + len - at) as u32;
                let got = ns
                    .read(ino, at, want, |d| {
                        out.extend_from_slice(d);
                        d.len()
                    })
                    .map_err(|e| format!("reading the cache at {at}: {e}"))?;
                if got == 0 {
                    break;
                }
                at += got as u64;
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Sends the file's bytes; returns the blob's ETag.
    async fn send(
        &self,
        ns: &Arc<Namespace>,
        f: &BlobFile,
        loc: &ObjPath,
    ) -> Result<String, String> {
        let cfg = &self.inner.cfg;
        let part = cfg.part_size.0;
        let store = &self.inner.store;
        let result = if f.size <= part {
            let data = Self::read(ns, f.ino, 0, f.size).await?;
            self.inner
                .stats
                .put_requests
                .fetch_add(1, Ordering::Relaxed);
            store
                .put(loc, PutPayload::from(data))
                .await
                .map_err(|e| e.to_string())?
        } else {
            let mut up = store.put_multipart(loc).await.map_err(|e| e.to_string())?;
            let mut parts = JoinSet::new();
            let mut off = 0;
            let mut failed = None;
            while off < f.size {
                if parts.len() >= cfg.parts_in_flight {
                    if let Some(Err(e)) = parts.join_next().await.map(part_result) {
                        failed = Some(e);
                        break;
                    }
                }
                let data = match Self::read(ns, f.ino, off, part.min(f.size - off)).await {
                    Ok(d) if d.is_empty() => break,
                    Ok(d) => d,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                off += data.len() as u64;
                self.inner
                    .stats
                    .block_requests
                    .fetch_add(1, Ordering::Relaxed);
                parts.spawn(up.put_part(PutPayload::from(data)));
            }
            while let Some(r) = parts.join_next().await {
                if let Err(e) = part_result(r) {
                    failed.get_or_insert(e);
                }
            }
            if let Some(e) = failed {
                // Uncommitted blocks expire on their own (Azure: after a week).
                let _ = up.abort().await;
                return Err(e);
            }
            self.inner
                .stats
                .commit_requests
                .fetch_add(1, Ordering::Relaxed);
            up.complete().await.map_err(|e| e.to_string())?
        };
        match result.e_tag {
            Some(e) => Ok(e),
            None => store
                .head(loc)
                .await
                .map(|m| m.e_tag.unwrap_or_default())
                .map_err(|e| e.to_string()),
        }
    }
}

fn part_result(r: Result<object_store::Result<()>, tokio::task::JoinError>) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The backlog of `files`; `keyable` says whether a path can be a blob key.
fn summarize<'a>(
    files: impl Iterator<Item = &'a BlobFile>,
    keyable: impl Fn(&str) -> bool,
) -> Backlog {
    let now = now_ns();
    let mut b = Backlog::default();
    for f in files.filter(|f| f.is_dirty()) {
        if f.cache_only {
            b.cache_only_files += 1;
            continue;
        }
        b.dirty_files += 1;
        b.dirty_bytes += f.size;
        b.writing_files += u64::from(f.writing);
        b.flushing_files += u64::from(f.flushing);
        if !f.path.as_deref().is_some_and(&keyable) {
            b.unkeyable_files += 1;
        }
        let age_ms = (now.saturating_sub(f.ctime_ns).max(0) / 1_000_000) as u64;
        b.oldest_dirty_age_ms = b.oldest_dirty_age_ms.max(age_ms);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::under;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under("a/b", ""));
        assert!(under("a/b", "a"));
        assert!(under("a", "a"));
        assert!(!under("ab", "a"));
        assert!(!under("a", "a/b"));
        assert!(under("a/b/c", "a/b"));
    }
}
