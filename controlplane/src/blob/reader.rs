//! Cache-on-read from the object store: the namespace's [`BlobReader`] (see
//! `spool_fuse_shim::meta::remote` for the rules). Calls come from FUSE and RPC
//! threads, which block on the control runtime; every call is bounded by
//! `fetch_timeout_ms`, retries included, so an outage fails a read with EIO instead of
//! hanging it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use spool_fuse_shim::meta::remote::{BlobReader, Fetched, ListedFile, Listing};
use tokio::runtime::Handle;

use crate::config::{BlobConfig, BlobMode};

/// Counters, cumulative since start.
#[derive(Debug, Default)]
struct Stats {
    list_requests: AtomicU64,
    get_requests: AtomicU64,
    bytes_fetched: AtomicU64,
    errors: AtomicU64,
    /// Fetches refused because the blob's ETag changed since it was listed.
    changed: AtomicU64,
}

/// The store as the namespace reads it.
#[derive(Debug)]
pub struct StoreReader {
    cfg: BlobConfig,
    store: Arc<dyn ObjectStore>,
    rt: Handle,
    stats: Stats,
}

impl StoreReader {
    pub fn new(cfg: BlobConfig, store: Arc<dyn ObjectStore>, rt: Handle) -> StoreReader {
        StoreReader {
            cfg,
            store,
            rt,
            stats: Stats::default(),
        }
    }

    /// Runs `f` on the control runtime, bounded by `fetch_timeout_ms`.
    fn block_on<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, String> {
        let limit = Duration::from_millis(self.cfg.fetch_timeout_ms);
        self.rt
            .block_on(async { tokio::time::timeout(limit, f).await })
            .map_err(|_| {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                format!(
                    "{what}: no answer within blob.fetch_timeout_ms = {} ms",
                    self.cfg.fetch_timeout_ms
                )
            })
    }

    pub fn status(&self) -> serde_json::Value {
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "listing_ttl_ms": self.cfg.listing_ttl_ms,
            "requests": {"list": g(&s.list_requests), "get": g(&s.get_requests)},
            "bytes_fetched": g(&s.bytes_fetched),
            "errors": g(&s.errors),
            "changed_behind_cache": g(&s.changed),
        })
    }

    /// Prometheus text for the counters.
    pub fn prometheus(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        for (name, help, a) in [
            (
                "read_list_requests_total",
                "Directory listings of the store (cache-on-read).",
                &s.list_requests,
            ),
            (
                "read_get_requests_total",
                "Ranged fetches from the store (one per chunk fetched).",
                &s.get_requests,
            ),
            (
                "read_bytes_fetched_total",
                "Bytes fetched from the store into the cache.",
                &s.bytes_fetched,
            ),
            (
                "read_errors_total",
                "Failed or timed-out listings and fetches.",
                &s.errors,
            ),
            (
                "read_changed_total",
                "Fetches refused because the blob changed behind the cache.",
                &s.changed,
            ),
        ] {
            out.push_str(&format!(
                "# HELP spool_blob_{name} {help}\n# TYPE spool_blob_{name} counter\nspool_blob_{name} {}\n",
                a.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// Prometheus text for the evictions of the namespace running here.
pub fn eviction_prometheus(files: u64, bytes: u64) -> String {
    format!(
        "# HELP spool_blob_evicted_files_total Files whose clean chunks were evicted.\n\
         # TYPE spool_blob_evicted_files_total counter\nspool_blob_evicted_files_total {files}\n\
         # HELP spool_blob_evicted_bytes_total Bytes of clean chunks evicted (whole chunks).\n\
         # TYPE spool_blob_evicted_bytes_total counter\nspool_blob_evicted_bytes_total {bytes}\n"
    )
}

impl BlobReader for StoreReader {
    fn list(&self, dir: &str) -> Result<Listing, String> {
        let prefix = if dir.is_empty() {
            self.cfg.prefix.trim_end_matches('/').to_owned()
        } else {
            format!("{}{dir}", self.cfg.prefix)
        };
        let loc = ObjPath::parse(&prefix).map_err(|e| format!("{prefix:?}: {e}"))?;
        self.stats.list_requests.fetch_add(1, Ordering::Relaxed);
        let store = Arc::clone(&self.store);
        let r = self.block_on("listing", async move {
            store
                .list_with_delimiter((!prefix.is_empty()).then_some(&loc))
                .await
        })?;
        let r = r.map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            format!("listing {dir:?}: {e}")
        })?;
        let files = r
            .objects
            .into_iter()
            .filter_map(|o| {
                Some(ListedFile {
                    name: o.location.filename()?.to_owned(),
                    size: o.size,
                    etag: o.e_tag?,
                    mtime_ns: o.last_modified.timestamp_nanos_opt().unwrap_or(0),
                })
            })
            .collect();
        let dirs = r
            .common_prefixes
            .into_iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        Ok(Listing { files, dirs })
    }

    fn get(&self, key: &str, etag: &str, off: u64, len: u64) -> Result<Fetched, String> {
        let loc = super::store::object_key(&self.cfg.prefix, key)?;
        self.stats.get_requests.fetch_add(1, Ordering::Relaxed);
        let opts = GetOptions {
            // HTTP sends ETags quoted; a listing may give them bare.
            if_match: Some(format!("\"{}\"", etag.trim_matches('"'))),
            range: Some(GetRange::Bounded(off..off + len)),
            ..GetOptions::default()
        };
        let store = Arc::clone(&self.store);
        let r = self.block_on("fetch", async move {
            let g = store.get_opts(&loc, opts).await?;
            g.bytes().await
        })?;
        match r {
            Ok(b) => {
                self.stats
                    .bytes_fetched
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Fetched::Data(b.to_vec()))
            }
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                self.stats.changed.fetch_add(1, Ordering::Relaxed);
                Ok(Fetched::Changed)
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(format!("fetching {key:?} at {off}: {e}"))
            }
        }
    }

    fn listing_ttl(&self) -> Duration {
        Duration::from_millis(self.cfg.listing_ttl_ms)
    }

    fn prefetch_chunks(&self) -> u32 {
        self.cfg.prefetch_chunks
    }

    fn spawn(&self, f: Box<dyn FnOnce() + Send>) {
        drop(self.rt.spawn_blocking(f));
    }

    fn writeback(&self) -> bool {
        self.cfg.mode == BlobMode::Writeback
    }

    fn space_wait(&self) -> Duration {
        Duration::from_millis(self.cfg.space_wait_ms)
    }
}
